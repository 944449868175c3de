"""Runtime glue: the rollout and reward fleets the trainer calls.

Work is handed out in chunks as workers become free (`ray.wait`), so a fast worker is
not left idle while a slow one has a queue. A worker that dies mid-call (its actor is
gone) is replaced by a fresh one from its factory and the chunk is re-issued: the step
completes with every prompt scored exactly once.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError

from srpo_ray.records import Prompt, RolloutGroup, ScoredGroup

log = logging.getLogger(__name__)
MAX_REPLACEMENTS_PER_CALL = 3


class WorkerPool:
    """Actor handles of one role plus a factory to replace a dead one."""

    def __init__(self, role: str, factory: Callable[[int], Any], size: int):
        self.role, self.factory = role, factory
        self.workers = [factory(i) for i in range(size)]

    def replace(self, index: int) -> Any:
        log.warning("%s worker %d died; starting a replacement", self.role, index)
        self.workers[index] = self.factory(index)
        return self.workers[index]

    def map_chunks(self, chunks: Sequence[Any], call: Callable[[Any, int, Any], Any],
                   on_new_worker: Callable[[Any], None] = lambda w: None) -> list[Any]:
        """Run `call(worker, chunk_index, chunk)` for every chunk, results in chunk order."""
        results: list[Any] = [None] * len(chunks)
        pending = list(range(len(chunks)))[::-1]
        running: dict[Any, tuple[int, int]] = {}  # ref -> (chunk index, worker index)
        idle = list(range(len(self.workers)))
        replacements = 0
        while pending or running:
            while pending and idle:
                ci, wi = pending.pop(), idle.pop(0)
                running[call(self.workers[wi], ci, chunks[ci])] = (ci, wi)
            done, _ = ray.wait(list(running), num_returns=1)
            ci, wi = running.pop(done[0])
            try:
                results[ci] = ray.get(done[0])
            except RayActorError:
                replacements += 1
                if replacements > MAX_REPLACEMENTS_PER_CALL:
                    raise RuntimeError(f"{self.role} workers keep dying ({replacements} replacements in one "
                                       f"call); see the worker logs above") from None
                on_new_worker(self.replace(wi))
                pending.append(ci)
            idle.append(wi)
        return results


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    size = max(1, math.ceil(len(items) / max(1, parts)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class RayRolloutFleet:
    """Generation workers: prompts in, RolloutGroups out; weights pushed to all."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2):
        self.pool, self.chunks_per_worker = pool, chunks_per_worker
        self._weights: tuple[Any, int] | None = None  # latest (state ref, version) for replacements
        self.version = 0  # what every worker must hold; a worker holding another refuses to generate

    def generate(self, prompts: list[Prompt], sampling: dict, seed: int) -> list[RolloutGroup]:
        chunks = split(prompts, len(self.pool.workers) * self.chunks_per_worker)
        starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        # Prompt k of this step draws its samples from seeds base + k*n + j: distinct
        # within a step and across steps, whichever worker serves the chunk.
        base = seed * 1_000_000
        results = self.pool.map_chunks(
            chunks, lambda w, i, chunk: w.generate.remote(
                chunk, {**sampling, "seed": base + starts[i] * int(sampling["n"])}, self.version),
            on_new_worker=self._sync_new_worker)
        return [group for chunk in results for group in chunk]

    def push_weights(self, state_dict_ref: Any, version: int) -> None:
        self._weights = (state_dict_ref, version)
        held = self.pool.map_chunks(list(range(len(self.pool.workers))),
                                    lambda w, i, _: w.update_weights.remote(state_dict_ref, version),
                                    on_new_worker=self._sync_new_worker)
        if any(v != version for v in held):
            raise RuntimeError(f"weight sync failed: generators hold versions {held}, expected {version}")
        self.version = version

    def _sync_new_worker(self, worker: Any) -> None:
        if self._weights is not None:
            ray.get(worker.update_weights.remote(*self._weights))


class RayRewardFleet:
    """Reward workers: RolloutGroups in, ScoredGroups out."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2):
        self.pool, self.chunks_per_worker = pool, chunks_per_worker

    def score(self, groups: list[RolloutGroup]) -> list[ScoredGroup]:
        chunks = split(groups, len(self.pool.workers) * self.chunks_per_worker)
        results = self.pool.map_chunks(chunks, lambda w, i, chunk: w.score_groups.remote(chunk))
        return [sg for chunk in results for sg in chunk]
