"""How one training step gathers its scored groups: one round of rollouts (SRPO, plain
GRPO), or DAPO-style dynamic sampling, which keeps drawing prompts until the batch holds
`target` groups whose rewards differ (or a round cap is hit).

A collector is chosen once, when the trainer is built (`make_collector`), so the
training loop has no branches for it. It is pure Python: the trainer hands it two
callables, `draw(k)` (up to k more prompt ids from the ledger; [] when none are left
in this stage) and `run_round(ids, round_index)` (generate, score and record the groups
in the ledger; every group is recorded, also those the collector drops).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from srpo_ray.config.schema import AlgoConfig
from srpo_ray.records import ScoredGroup

DrawFn = Callable[[int], list[str]]
RoundFn = Callable[[list[str], int], list[ScoredGroup]]


@dataclass
class Collected:
    """train: the groups the step learns from. generated: every group scored in the
    step, dropped ones included (for rollout metrics). metrics: `collect/...` floats."""

    train: list[ScoredGroup]
    generated: list[ScoredGroup]
    metrics: dict[str, float] = field(default_factory=dict)


class BatchCollector(Protocol):
    def collect(self, prompt_ids: list[str], target: int, draw: DrawFn, run_round: RoundFn) -> Collected:
        """Scored groups for one step, starting from `prompt_ids` (already drawn);
        `target` is the step's prompts_per_step."""
        ...


def has_reward_variance(group: ScoredGroup) -> bool:
    """True when the group's rewards are not all equal (it carries a policy gradient)."""
    rewards = group.rewards
    return max(rewards) != min(rewards)


class SingleRound:
    """One round: every group of the first draw goes to the batch (SRPO). Zero-variance
    groups still add nothing to the gradient: they get zero advantages."""

    def collect(self, prompt_ids: list[str], target: int, draw: DrawFn, run_round: RoundFn) -> Collected:
        scored = run_round(prompt_ids, 0)
        return Collected(train=scored, generated=scored,
                         metrics={"collect/rounds": 1.0, "collect/prompts_drawn": float(len(prompt_ids)),
                                  "collect/groups_kept": float(len(scored))})


class DynamicSampling:
    """DAPO's dynamic sampling: drop groups with zero reward variance and draw more
    prompts until `target` groups with variance are kept or `max_rounds` rounds ran.

    Each extra round draws the shortfall divided by the share of groups kept so far (the
    expected yield), at most `target` prompts, at least one. Groups beyond `target` are
    dropped too (in draw order), so the batch size stays constant, as in DAPO. A step
    that runs out of prompts or rounds trains on what it has (possibly fewer groups).
    """

    def __init__(self, max_rounds: int):
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
            raise ValueError(f"algo.dynamic_sampling_max_rounds must be an integer >= 1, got {max_rounds!r}")
        self.max_rounds = max_rounds

    def collect(self, prompt_ids: list[str], target: int, draw: DrawFn, run_round: RoundFn) -> Collected:
        kept: list[ScoredGroup] = []
        generated: list[ScoredGroup] = []
        ids, rounds, drawn = list(prompt_ids), 0, 0
        while ids:
            scored = run_round(ids, rounds)
            rounds, drawn = rounds + 1, drawn + len(ids)
            generated += scored
            kept += [g for g in scored if has_reward_variance(g)]
            if len(kept) >= target or rounds >= self.max_rounds:
                break
            ids = draw(self._draw_size(target - len(kept), len(kept) / len(generated), target))
        train = kept[:target]
        return Collected(train=train, generated=generated, metrics={
            "collect/rounds": float(rounds), "collect/prompts_drawn": float(drawn),
            "collect/groups_kept": float(len(train)),
            "collect/filled": float(len(train) >= target),
        })

    @staticmethod
    def _draw_size(shortfall: int, yield_so_far: float, target: int) -> int:
        if yield_so_far <= 0:
            return target
        return max(1, min(target, math.ceil(shortfall / yield_so_far)))


def make_collector(cfg: AlgoConfig) -> BatchCollector:
    """algo.dynamic_sampling picks DynamicSampling, else SingleRound."""
    if cfg.dynamic_sampling:
        return DynamicSampling(cfg.dynamic_sampling_max_rounds)
    return SingleRound()
