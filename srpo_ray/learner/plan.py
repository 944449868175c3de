"""What a step trains on, planned from lengths alone: the rows (one per kept sample), how
they are split over the learner ranks, and each rank's shard, which the rank turns into
its own padded batch once it has fetched the tokens. Pure Python + torch; no Ray.

The driver holds no tokens at the paper's shape (256 prompts x 32 samples x thousands of
tokens): a row names its group's tokens (`GroupTokens`, or a reference to them that the
rank fetches) and the sample in it, and carries the lengths the plan needs. The rows, the
partition and each shard's batch are exactly what `build_train_batch` + `split_for_ranks`
give for the same groups (tests/unit/test_train_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from srpo_ray.algo.loss import _check_agg
from srpo_ray.learner.batch import TrainBatch, empty_batch, partition_by_length
from srpo_ray.records import GroupTokens, ScoredGroup


@dataclass(frozen=True)
class TrainRow:
    """One sequence to train on: sample `sample` of the step's group `group` (its tokens
    are the shard's `tokens[group]`); `domain` is its prompt's (per-domain metrics)."""

    group: int
    sample: int
    advantage: float
    prompt_len: int
    response_len: int
    domain: str = ""

    @property
    def length(self) -> int:
        """Real tokens (prompt + response): what the sequence costs a rank."""
        return self.prompt_len + self.response_len


@dataclass
class TrainShard:
    """One rank's rows, in batch order, and the tokens of their groups (GroupTokens or
    references, one per group); `build` pads the rows once the tokens are here."""

    rows: list[TrainRow]
    tokens: dict[int, Any]
    pad_token_id: int

    def references(self) -> dict[int, Any]:
        """The tokens this shard needs, one per group (GroupTokens or references)."""
        return dict(self.tokens)

    def build(self, tokens: dict[int, GroupTokens]) -> TrainBatch:
        """The shard's right-padded TrainBatch (alignment: srpo_ray/learner/batch.py), from
        the groups' tokens keyed like `references()`."""
        if not self.rows:
            return empty_batch()
        n, length = len(self.rows), max(row.length for row in self.rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n, length, dtype=torch.long)
        response_mask = torch.zeros(n, length)
        rollout_logprobs = torch.zeros(n, length)
        for b, row in enumerate(self.rows):
            group = tokens[row.group]
            ids, logprobs = group.response(row.sample)
            if len(logprobs) != len(ids):
                raise ValueError(f"sample {row.sample} of a group has {len(ids)} tokens but {len(logprobs)} "
                                 "log-probs; request one log-prob per sampled token from the generator")
            p, end = row.prompt_len, row.length
            input_ids[b, :p] = torch.tensor(group.prompt_token_ids, dtype=torch.long)
            input_ids[b, p:end] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, :end] = 1
            response_mask[b, p:end] = 1
            rollout_logprobs[b, p:end] = torch.tensor(logprobs, dtype=torch.float32)
        return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                          advantages=torch.tensor([row.advantage for row in self.rows], dtype=torch.float32),
                          rollout_logprobs=rollout_logprobs, domains=_domains(self.rows))


@dataclass
class TrainRows:
    """The step's rows, in batch order (group by group, sample by sample), and each
    group's tokens (GroupTokens or a reference), keyed by group index."""

    rows: list[TrainRow]
    tokens: dict[int, Any]
    pad_token_id: int

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    @property
    def num_response_tokens(self) -> int:
        return sum(row.response_len for row in self.rows)

    @property
    def advantages(self) -> list[float]:
        return [row.advantage for row in self.rows]

    def denominator(self, loss_agg: str) -> float:
        """The batch's loss denominator (algo/loss.py count_denominator): response tokens,
        or sequences (every row has at least one response token)."""
        _check_agg(loss_agg)
        return float(self.num_response_tokens if loss_agg == "token-mean" else self.num_sequences)

    def shards(self, world_size: int) -> list[TrainShard]:
        """One shard per rank, balanced by real tokens (partition_by_length)."""
        parts = partition_by_length([row.length for row in self.rows], world_size)
        return [self._shard([self.rows[i] for i in part]) for part in parts]

    def _shard(self, rows: list[TrainRow]) -> TrainShard:
        return TrainShard(rows, {row.group: self.tokens[row.group] for row in rows}, self.pad_token_id)

    def build(self) -> TrainBatch:
        """All rows as one batch (tokens must be here): tests and one-process learners."""
        shard = self._shard(self.rows)
        return shard.build(shard.references())

    @classmethod
    def of_batch(cls, batch: TrainBatch, pad_token_id: int = 0) -> "TrainRows":
        """Rows of an already padded batch (one group per row; tests and tools that build
        batches themselves)."""
        rows, held = [], {}
        for b in range(batch.num_sequences):
            real = batch.attention_mask[b].bool()
            response = batch.response_mask[b].bool()
            prompt_len = int((real & ~response).sum())
            ids = batch.input_ids[b][real].to(torch.int32).numpy()
            held[b] = GroupTokens(prompt_token_ids=ids[:prompt_len], token_ids=ids[prompt_len:],
                                  logprobs=batch.rollout_logprobs[b][real][prompt_len:].numpy().copy(),
                                  offsets=torch.tensor([0, len(ids) - prompt_len]).numpy())
            domain = batch.domains[b] if batch.domains else ""
            rows.append(TrainRow(b, 0, float(batch.advantages[b]), prompt_len, len(ids) - prompt_len, domain))
        return cls(rows, held, pad_token_id)


def select_train_rows(groups: Sequence[ScoredGroup], advantages: list[list[float]], pad_token_id: int,
                      drop_zero_advantage_groups: bool = True) -> TrainRows:
    """The rows to train on: `advantages[g][i]` is sample i of group g's. With
    `drop_zero_advantage_groups`, groups whose advantages are all zero (every rollout got
    the same reward) are left out: no policy gradient, only compute. Samples with an empty
    response carry nothing to train on and are skipped."""
    if len(groups) != len(advantages):
        raise ValueError(f"select_train_rows: got {len(groups)} groups but {len(advantages)} "
                         f"advantage lists; pass one list per group")
    rows, tokens = [], {}
    for g, (scored, adv) in enumerate(zip(groups, advantages)):
        group = scored.group
        if len(adv) != len(group.samples):
            raise ValueError(f"group {g} (prompt {group.prompt.prompt_id!r}) has {len(group.samples)} "
                             f"samples but {len(adv)} advantages")
        if drop_zero_advantage_groups and all(a == 0 for a in adv):
            continue
        if not group.prompt_len:
            raise ValueError(f"group {g} (prompt {group.prompt.prompt_id!r}) has no prompt tokens; "
                             "the first response token needs a context")
        kept = [TrainRow(g, i, float(a), group.prompt_len, s.num_tokens, group.prompt.domain)
                for i, (s, a) in enumerate(zip(group.samples, adv)) if s.num_tokens]
        if kept:
            rows += kept
            tokens[g] = group.tokens
    return TrainRows(rows, tokens, pad_token_id)


def _domains(rows: list[TrainRow]) -> tuple[str, ...]:
    """The rows' domains, or () when any is unknown (rows built without one)."""
    domains = tuple(row.domain for row in rows)
    return domains if all(domains) else ()


def build_train_batch(groups: Sequence[ScoredGroup], advantages: list[list[float]], pad_token_id: int,
                      drop_zero_advantage_groups: bool = True) -> TrainBatch:
    """The groups' rows (select_train_rows) as one right-padded batch; tokens must be here."""
    return select_train_rows(groups, advantages, pad_token_id, drop_zero_advantage_groups).build()


def token_imbalance(shards: list[TrainShard]) -> float:
    """Most-loaded rank's real tokens over the mean (1.0: perfectly balanced)."""
    loads = [sum(row.length for row in shard.rows) for shard in shards]
    mean = sum(loads) / max(1, len(loads))
    return max(loads) / mean if mean else 1.0


def fetch_and_build(shard: TrainShard, fetch: Callable[[list[Any]], list[GroupTokens]]) -> TrainBatch:
    """The shard's batch, its tokens fetched with `fetch` (references -> GroupTokens;
    ray.get on a learner rank) where they are not here already."""
    refs = shard.references()
    remote = [k for k, t in refs.items() if not isinstance(t, GroupTokens)]
    fetched = dict(zip(remote, fetch([refs[k] for k in remote]))) if remote else {}
    return shard.build({k: fetched.get(k, t) for k, t in refs.items()})
