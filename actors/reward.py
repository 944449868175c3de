"""Reward worker as a Ray actor: a thin shell around srpo_ray.rewards.scorer.RewardScorer.

    worker = RewardWorker.options(num_cpus=...).remote(cfg.reward)
    results = ray.get(worker.score.remote([ScoreRequest.of(g) for g in groups]))

It gets what it scores (ScoreRequest: the prompt's answer key and the response texts, no
token ids or log-probs) and returns only the verdicts, one list of RewardResult per
request; the caller joins them to its groups (records.join_scores).

A synchronous actor (max_concurrency 1): nothing here needs signals, but one call at a
time keeps one sandboxed program per reserved CPU (cfg.code_parallel raises that).
Construction fails with RewardScorer's RuntimeError when the sandbox does not work.
"""
from __future__ import annotations

from typing import Any

import ray

from srpo_ray.config.schema import RewardConfig
from srpo_ray.records import RewardResult, ScoreRequest
from srpo_ray.rewards.scorer import RewardScorer
from srpo_ray.telemetry.console import redirect_actor_output


class RewardWorkerImpl:
    def __init__(self, cfg: RewardConfig) -> None:
        redirect_actor_output()  # srpo_ray/telemetry/console.py
        self._scorer = RewardScorer(cfg)

    def score(self, requests: list[ScoreRequest]) -> list[list[RewardResult]]:
        return self._scorer.score_requests(requests)

    def score_texts(self, keys: list[ScoreRequest], texts: list[Any]) -> list[list[RewardResult]]:
        """Score answer keys (ScoreRequests without texts) against their group's texts:
        a tuple, or a reference fetched here from the object store (not via the driver)."""
        refs = [t for t in texts if not isinstance(t, tuple)]
        fetched = iter(ray.get(refs) if refs else [])
        held = [t if isinstance(t, tuple) else next(fetched) for t in texts]
        return self._scorer.score_requests([k.with_texts(t) for k, t in zip(keys, held)])

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self._scorer.close()


RewardWorker = ray.remote(max_concurrency=1)(RewardWorkerImpl)
