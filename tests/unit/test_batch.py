"""Unit tests of srpo_ray.learner.batch: packing scored groups into padded tensors, splitting
over ranks and into micro-batches."""
from __future__ import annotations

import pytest
import torch

from srpo_ray.algo.loss import count_denominator
from srpo_ray.learner.batch import (
    TrainBatch,
    empty_batch,
    micro_batches,
    padding_fraction,
    split_for_ranks,
    split_into_chunks,
)
from srpo_ray.learner.plan import build_train_batch
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup

PAD = 0


def scored_group(prompt_ids: list[int], responses: list[list[int]], pid: str = "p") -> ScoredGroup:
    """Sample i's token j gets log-prob -(100 * i + j + 1) / 1000: unique, so tests can
    see exactly where every value lands."""
    samples = [Sample(token_ids=r, logprobs=[-(100 * i + j + 1) / 1000 for j in range(len(r))],
                      text="", finish_reason="stop") for i, r in enumerate(responses)]
    group = RolloutGroup.of(prompt=Prompt(pid, "math", [{"role": "user", "content": "q"}], "1"),
                         prompt_token_ids=prompt_ids, samples=samples, policy_version=0)
    return ScoredGroup(group=group, results=[RewardResult(1.0, True) for _ in responses])


def test_positions_masks_and_padding():
    g = scored_group([11, 12, 13], [[21, 22], [31, 32, 33, 34]])
    b = build_train_batch([g], [[0.5, -0.5]], pad_token_id=PAD)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, PAD, PAD], [11, 12, 13, 31, 32, 33, 34]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    # response_mask marks the positions whose TOKEN is a response token
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    # rollout_logprobs[b, t] is the sampler's log-prob of input_ids[b, t]
    assert b.rollout_logprobs[0, 3:5].tolist() == pytest.approx([-0.001, -0.002])
    assert b.rollout_logprobs[1, 3:7].tolist() == pytest.approx([-0.101, -0.102, -0.103, -0.104])
    assert b.rollout_logprobs[b.response_mask == 0].abs().sum() == 0
    assert b.advantages.tolist() == [0.5, -0.5]
    assert b.num_response_tokens == 6 and b.num_sequences == 2 and b.num_tokens == 12
    assert b.input_ids.dtype == torch.long and b.response_mask.dtype == torch.float32


def test_zero_advantage_groups_dropped_and_denominator_counts_kept_tokens():
    kept = scored_group([1, 2], [[3, 4, 5], [6]], pid="kept")
    flat = scored_group([1, 2, 3], [[7, 8], [9, 9]], pid="all-same-reward")
    b = build_train_batch([kept, flat], [[1.0, -1.0], [0.0, 0.0]], pad_token_id=PAD)
    assert b.num_sequences == 2
    assert count_denominator(b.response_mask, "token-mean") == 4.0  # 3 + 1 tokens of the kept group only
    assert count_denominator(b.response_mask, "seq-mean-token-mean") == 2.0
    both = build_train_batch([kept, flat], [[1.0, -1.0], [0.0, 0.0]], pad_token_id=PAD,
                             drop_zero_advantage_groups=False)
    assert both.num_sequences == 4 and both.num_response_tokens == 8
    # a zero advantage of one sample does not drop its group
    assert build_train_batch([kept], [[0.0, 1.0]], pad_token_id=PAD).num_sequences == 2
    empty = build_train_batch([flat], [[0.0, 0.0]], pad_token_id=PAD)
    assert empty.num_sequences == 0 and empty.num_response_tokens == 0


def test_bad_inputs_raise_with_names():
    g = scored_group([1], [[2], [3]])
    with pytest.raises(ValueError, match="2 samples but 1 advantages"):
        build_train_batch([g], [[1.0]], pad_token_id=PAD)
    with pytest.raises(ValueError, match="1 groups but 2 advantage lists"):
        build_train_batch([g], [[1.0, 0.0], [1.0]], pad_token_id=PAD)
    with pytest.raises(ValueError, match="no prompt tokens"):
        build_train_batch([scored_group([], [[2], [3]])], [[1.0, -1.0]], pad_token_id=PAD)
    with pytest.raises(ValueError, match="1 tokens but 2 log-probs"):
        RolloutGroup.of(g.group.prompt, [1], [Sample([2], [-1.0, -1.0], "", "stop")], 0)
    with pytest.raises(ValueError, match="loss_agg"):
        count_denominator(build_train_batch([scored_group([1], [[2], [3]])], [[1.0, -1.0]], PAD).response_mask, "sum")


def _batch_of_lengths(lengths: list[int]) -> TrainBatch:
    g = scored_group([1], [[5] * (n - 1) for n in lengths])
    return build_train_batch([g], [[float(i + 1) for i in range(len(lengths))]], pad_token_id=PAD)


def test_split_for_ranks_balances_tokens_and_keeps_every_sequence():
    b = _batch_of_lengths([10, 9, 8, 3, 2, 2, 1 + 1])
    shards = split_for_ranks(b, 2)
    loads = [s.num_tokens for s in shards]
    assert sum(loads) == b.num_tokens and max(loads) - min(loads) <= 2
    seen = sorted(a for s in shards for a in s.advantages.tolist())
    assert seen == sorted(b.advantages.tolist())
    for s in shards:  # each shard is trimmed to its own longest row and keeps batch order
        assert s.input_ids.shape[1] == s.attention_mask.sum(1).max()
        assert s.advantages.tolist() == sorted(s.advantages.tolist())


def test_split_for_ranks_gives_empty_shards_when_too_few_sequences():
    b = _batch_of_lengths([4])
    shards = split_for_ranks(b, 3)
    assert [s.num_sequences for s in shards].count(1) == 1
    assert [s.num_sequences for s in shards].count(0) == 2
    for s in shards:
        if s.num_sequences == 0:
            assert s.num_response_tokens == 0 and s.input_ids.shape == (0, 0)
    assert [s.num_sequences for s in split_for_ranks(empty_batch(), 2)] == [0, 0]
    with pytest.raises(ValueError, match="world_size"):
        split_for_ranks(b, 0)


def test_micro_batches_take_similar_lengths_together_and_cover_the_batch():
    b = _batch_of_lengths([3, 7, 2, 5, 4])
    mbs = micro_batches(b, 2)
    assert [m.num_sequences for m in mbs] == [2, 2, 1]
    assert [m.input_ids.shape[1] for m in mbs] == [7, 4, 2]  # longest first, trimmed per micro-batch
    assert sorted(torch.cat([m.advantages for m in mbs]).tolist()) == sorted(b.advantages.tolist())
    assert padding_fraction(mbs) < padding_fraction([b.select([0, 1]), b.select([2, 3]), b.select([4])])
    assert sum(m.num_response_tokens for m in mbs) == b.num_response_tokens
    assert micro_batches(empty_batch(), 4) == []
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(b, 0)
    assert [m.input_ids.shape for m in micro_batches(b, 4, max_tokens=12)] == [(1, 7), (2, 5), (2, 3)]
    chunks = split_into_chunks(b, 2)
    assert [c.num_sequences for c in chunks] == [2, 3] or [c.num_sequences for c in chunks] == [3, 2]
    assert [c.num_sequences for c in split_into_chunks(_batch_of_lengths([3]), 2)].count(0) == 1
