"""Reward worker as a Ray actor: a thin shell around srpo_ray.rewards.scorer.RewardScorer.

    worker = RewardWorker.options(num_cpus=...).remote(cfg.reward)
    scored = ray.get(worker.score_groups.remote(groups))

A synchronous actor (max_concurrency 1): nothing here needs signals, but one call at a
time keeps one sandboxed program per reserved CPU (cfg.code_parallel raises that).
Construction fails with RewardScorer's RuntimeError when the sandbox does not work.
"""
from __future__ import annotations

import ray

from srpo_ray.config.schema import RewardConfig
from srpo_ray.telemetry.console import redirect_actor_output
from srpo_ray.records import RolloutGroup, ScoredGroup
from srpo_ray.rewards.scorer import RewardScorer


class RewardWorkerImpl:
    def __init__(self, cfg: RewardConfig) -> None:
        redirect_actor_output()  # srpo_ray/telemetry/console.py
        self._scorer = RewardScorer(cfg)

    def score_groups(self, groups: list[RolloutGroup]) -> list[ScoredGroup]:
        scored = self._scorer.score_batch([(g.prompt, [s.text for s in g.samples]) for g in groups])
        return [ScoredGroup(group=g, results=r) for g, r in zip(groups, scored)]

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self._scorer.close()


_RewardWorkerImpl = RewardWorkerImpl
RewardWorker = ray.remote(max_concurrency=1)(RewardWorkerImpl)
