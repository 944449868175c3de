"""Training batches: padded tensors, split over learner ranks and into micro-batches
(the rows come from srpo_ray/learner/plan.py). Pure torch; no Ray.

Token alignment (every [B, T] tensor of a TrainBatch follows it):
    row b is `prompt_token_ids + response token_ids`, right-padded to T with pad_token_id.
    Position t holds token `input_ids[b, t]`; any per-token value at position t is about
    THAT token: `logprobs[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, which the
    model computes from the logits at position t - 1.
    `response_mask[b, t] = 1` exactly where `input_ids[b, t]` is a response token, so
    `rollout_logprobs[b, t]` is vLLM's log-prob of that sampled token (0 elsewhere).
    Position 0 is always a prompt token (prompts must be non-empty), so no response
    token lacks a preceding context.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, fields

import torch


@dataclass
class TrainBatch:
    """B sequences of length T (see the module docstring for the alignment).

    input_ids         [B, T] int64   prompt + response, right-padded
    attention_mask    [B, T] int64   1 on real tokens (prompt and response), 0 on padding
    response_mask     [B, T] float32 1 on response tokens
    advantages        [B]    float32 one advantage per sequence
    rollout_logprobs  [B, T] float32 the sampler's log-prob of each response token
    domains           [B]    str     each sequence's prompt domain (math, code, a plug-in's
                                     ability), for per-domain metrics; () = not known
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    domains: tuple[str, ...] = ()

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: the compute a sequence costs."""
        return int(self.attention_mask.sum().item())

    def select(self, index: list[int] | torch.Tensor) -> "TrainBatch":
        """The sequences at `index`, trimmed to their own longest length."""
        idx = torch.as_tensor(index, dtype=torch.long)
        tensors = {f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "domains"}
        domains = tuple(self.domains[i] for i in idx.tolist()) if self.domains else ()
        return TrainBatch(**tensors, domains=domains).trimmed()

    def trimmed(self) -> "TrainBatch":
        """Drop trailing columns that are padding in every row (rows are right-padded)."""
        if self.num_sequences == 0:
            length = 0
        else:
            length = int(self.attention_mask.sum(dim=1).max().item())
        return TrainBatch(
            input_ids=self.input_ids[:, :length],
            attention_mask=self.attention_mask[:, :length],
            response_mask=self.response_mask[:, :length],
            advantages=self.advantages,
            rollout_logprobs=self.rollout_logprobs[:, :length],
            domains=self.domains,
        )


def empty_batch() -> TrainBatch:
    """A batch with no sequences (shape [0, 0]); a rank that gets it still joins collectives."""
    return TrainBatch(
        input_ids=torch.zeros(0, 0, dtype=torch.long),
        attention_mask=torch.zeros(0, 0, dtype=torch.long),
        response_mask=torch.zeros(0, 0),
        advantages=torch.zeros(0),
        rollout_logprobs=torch.zeros(0, 0),
    )


def partition_by_length(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices of `lengths` for each of `world_size` ranks, balanced by total length
    (longest first onto the least-loaded rank, as verl's balance_batch), each in index
    order. With fewer items than ranks some ranks get none: they still join every
    collective (the learner runs dummy passes)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    ranks = [(0, 0, r) for r in range(world_size)]  # (load, rows, rank): the heap's least is the target
    for i in order:
        load, rows, rank = heapq.heappop(ranks)
        assigned[rank].append(i)
        heapq.heappush(ranks, (load + lengths[i], rows + 1, rank))
    return [sorted(idx) for idx in assigned]


def split_for_ranks(batch: TrainBatch, world_size: int) -> list[TrainBatch]:
    """Split sequences over `world_size` ranks so that real-token counts are balanced
    (longest sequence first onto the least-loaded rank). Nothing is padded in: with
    fewer sequences than ranks some shards are empty (`num_sequences == 0`), and those
    ranks must still take part in every collective (the learner runs dummy passes).
    Each shard keeps its sequences in batch order and is trimmed to its own length."""
    lengths = batch.attention_mask.sum(dim=1).tolist() if batch.num_sequences else []
    return [batch.select(idx) if idx else empty_batch() for idx in partition_by_length(lengths, world_size)]


def split_into_chunks(batch: TrainBatch, num_chunks: int) -> list[TrainBatch]:
    """`num_chunks` contiguous, near-equal (by sequence count) chunks; some may be empty."""
    if num_chunks < 1:
        raise ValueError(f"split_into_chunks: num_chunks must be >= 1, got {num_chunks}")
    n = batch.num_sequences
    bounds = [round(k * n / num_chunks) for k in range(num_chunks + 1)]
    return [batch.select(list(range(lo, hi))) if hi > lo else empty_batch()
            for lo, hi in zip(bounds, bounds[1:])]


def micro_batches(batch: TrainBatch, micro_batch_size: int, max_tokens: int = 0) -> list[TrainBatch]:
    """Micro-batches of at most `micro_batch_size` sequences and, with `max_tokens` > 0,
    at most that many padded tokens (rows x longest row; a longer sequence goes alone),
    each trimmed to its own longest sequence. Sequences are taken longest first, so
    the rows of a micro-batch have similar lengths and little padding: a group's samples
    range from a few tokens to the length cap, and in batch order every micro-batch
    would be padded to its longest. The loss does not depend on the order (token-mean
    and sequence-mean are sums over sequences with a global denominator). Deterministic:
    the same batch gives the same micro-batches. An empty batch gives an empty list."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batches: micro_batch_size must be >= 1 "
                         f"(learner.micro_batch_size), got {micro_batch_size}")
    if batch.num_sequences == 0:
        return []
    lengths = batch.attention_mask.sum(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = [[]]
    for i in order:
        current = groups[-1]
        longest = lengths[current[0]] if current else lengths[i]
        full = len(current) >= micro_batch_size or (max_tokens > 0 and (len(current) + 1) * longest > max_tokens)
        if current and full:
            groups.append([i])
        else:
            current.append(i)
    return [batch.select(g) for g in groups]


def padding_fraction(mbs: list[TrainBatch]) -> float:
    """Share of the positions of `mbs` that are padding (compute spent on nothing)."""
    positions = sum(mb.input_ids.numel() for mb in mbs)
    return 1.0 - sum(mb.num_tokens for mb in mbs) / positions if positions else 0.0
