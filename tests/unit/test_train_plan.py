"""The train plan (srpo_ray/learner/plan.py): rows from lengths alone, shards by reference,
and each rank's batch exactly what the old one-batch path built and split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from srpo_ray.learner.batch import TrainBatch, split_for_ranks
from srpo_ray.learner.plan import TrainRows, build_train_batch, fetch_and_build, select_train_rows, token_imbalance
from srpo_ray.records import GroupTokens, Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup

PAD = 0


def _groups(seed: int = 0) -> list[ScoredGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(5):
        prompt = rng.integers(1, 500, size=int(rng.integers(1, 6)))
        samples = []
        for i in range(4):
            n = int(rng.integers(0, 9))  # empty responses happen: skipped
            samples.append(Sample(rng.integers(1, 500, size=n), rng.normal(size=n).astype(np.float32) - 2,
                                  f"text {g}.{i}", "length" if n == 8 else "stop"))
        group = RolloutGroup.of(Prompt(f"p{g}", "math", [], "1"), prompt, samples, 0)
        out.append(ScoredGroup(group, [RewardResult(float(i % 2), bool(i % 2)) for i in range(4)]))
    return out


def _advantages(groups: list[ScoredGroup]) -> list[list[float]]:
    # group 2 has all-zero advantages: dropped
    return [[0.0] * 4 if g == 2 else [0.5 * (i - 1.5) + g for i in range(4)] for g in range(len(groups))]


def _same(a: TrainBatch, b: TrainBatch) -> None:
    for name in ("input_ids", "attention_mask", "response_mask", "advantages", "rollout_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


def _reference_batch(groups: list[ScoredGroup], advantages: list[list[float]]) -> TrainBatch:
    """What build_train_batch built before the plan: rows in group/sample order."""
    rows = []
    for sg, adv in zip(groups, advantages):
        if all(a == 0 for a in adv):
            continue
        t = sg.group.tokens
        for i, a in enumerate(adv):
            ids, lps = t.response(i)
            if len(ids):
                rows.append((t.prompt_token_ids.tolist() + ids.tolist(), len(t.prompt_token_ids), lps.tolist(), a))
    length = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention, response, logprobs = torch.zeros(len(rows), length, dtype=torch.long), torch.zeros(
        len(rows), length), torch.zeros(len(rows), length)
    for b, (ids, p, lps, _) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention[b, :len(ids)] = 1
        response[b, p:len(ids)] = 1
        logprobs[b, p:len(ids)] = torch.tensor(lps, dtype=torch.float32)
    return TrainBatch(input_ids, attention, response, torch.tensor([r[3] for r in rows], dtype=torch.float32),
                      logprobs)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_each_ranks_shard_is_exactly_the_split_of_the_whole_batch(world_size):
    groups = _groups()
    advantages = _advantages(groups)
    whole = _reference_batch(groups, advantages)
    _same(build_train_batch(groups, advantages, PAD), whole)
    rows = select_train_rows(groups, advantages, PAD)
    assert rows.num_sequences == whole.num_sequences
    assert rows.denominator("token-mean") == float(whole.response_mask.sum())
    assert rows.denominator("seq-mean-token-mean") == float(whole.num_sequences)
    for shard, expected in zip(rows.shards(world_size), split_for_ranks(whole, world_size)):
        _same(shard.build(shard.references()), expected)


def test_ranks_fetch_only_their_groups_by_reference():
    groups = _groups(1)
    advantages = _advantages(groups)
    here = {g: sg.group.tokens for g, sg in enumerate(groups)}
    by_ref = [ScoredGroup(sg.group.by_reference(f"ref-{g}", sg.group.texts), sg.results) for g, sg in enumerate(groups)]
    rows = select_train_rows(by_ref, advantages, PAD)
    fetched: list[list[str]] = []

    def fetch(refs: list[str]) -> list[GroupTokens]:
        fetched.append(list(refs))
        return [here[int(r.split("-")[1])] for r in refs]

    for shard, expected in zip(rows.shards(2), select_train_rows(groups, advantages, PAD).shards(2)):
        _same(fetch_and_build(shard, fetch), expected.build(expected.references()))
    assert all(len(refs) == len(set(refs)) for refs in fetched)  # one fetch per group, not per row
    assert "ref-2" not in sum(fetched, [])  # the zero-advantage group is never fetched


def test_token_imbalance_and_of_batch_round_trip():
    groups = _groups(2)
    rows = select_train_rows(groups, _advantages(groups), PAD)
    shards = rows.shards(3)
    loads = [sum(r.length for r in s.rows) for s in shards]
    assert token_imbalance(shards) == pytest.approx(max(loads) / (sum(loads) / 3))
    whole = rows.build()
    _same(TrainRows.of_batch(whole, PAD).build(), whole)


def test_a_group_without_prompt_tokens_or_with_short_logprobs_is_refused():
    with pytest.raises(ValueError, match="no prompt tokens"):
        group = RolloutGroup.of(Prompt("p", "math", [], "1"), [], [Sample([3], [-1.0], "", "stop")], 0)
        select_train_rows([ScoredGroup(group, [RewardResult(1.0, True)])], [[1.0]], PAD)
    no_logprobs = RolloutGroup.of(Prompt("p", "math", [], "1"), [1], [Sample([3, 4], [], "", "stop")], 0)
    rows = select_train_rows([ScoredGroup(no_logprobs, [RewardResult(1.0, True)])], [[1.0]], PAD)
    with pytest.raises(ValueError, match="2 tokens but 0 log-probs"):
        rows.build()
