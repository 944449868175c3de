"""Runtime glue: the rollout and reward fleets the trainer calls.

Each fleet hands its work out in chunks over an elastic WorkerPool
(srpo_ray/runtime/worker_pool.py): dead workers are replaced and their chunks re-issued, and
the pool can be resized while a run goes (`scale_to`, or a request file written by
`python -m srpo_ray.scale`). A new rollout worker loads the current weights before it
serves. Weights reach the generators as the learner published them
(srpo_ray/weight_sync.py): a shared-memory file on the learner's node, buckets in the
object store, a broadcast from the learner's rank 0, or (fakes, old callers) an object
ref to a whole state dict. Rollouts from
weights older than rollout.max_staleness allows are discarded and regenerated.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from srpo_ray.records import Prompt, RolloutGroup, ScoredGroup
from srpo_ray.scale import ScaleRequestError, read_scale_request
from srpo_ray.weight_shm import WeightsSupersededError
from srpo_ray.weight_sync import PublishedWeights, StalePolicyError
from srpo_ray.runtime.worker_pool import MAX_REPLACEMENTS_PER_CALL, RETRY, Member, WorkerPool, split

__all__ = ["RayRolloutFleet", "RayRewardFleet", "WorkerPool", "split"]
log = logging.getLogger(__name__)


class RayRolloutFleet:
    """Generation workers: prompts in, RolloutGroups out; weights pushed to all.

    max_staleness: a rollout whose policy version is older than the latest pushed
    version minus this is discarded and its chunk regenerated after the worker loads
    the latest weights (rollout/stale_discarded counts the groups). control_dir: where
    `python -m srpo_ray.scale` writes resize requests (the run dir); None: no requests."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2, max_staleness: int = 0,
                 control_dir: str | Path | None = None):
        self.pool, self.chunks_per_worker = pool, chunks_per_worker
        self.max_staleness, self.control_dir = max_staleness, control_dir
        self.version = 0  # the latest pushed version; the model_path weights are version 0
        self._delivery: _Delivery | None = None
        self._groups = _BroadcastGroups()
        self._applied_request: str | None = None
        self._counts: Counter = Counter()

    # ---------------------------------------------------------------- rollouts
    def generate(self, prompts: list[Prompt], sampling: dict, seed: int) -> list[RolloutGroup]:
        self.apply_scale_request()
        self.pool.poll()
        chunks = split(prompts, chunk_count(self.pool.target, self.chunks_per_worker))
        starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        # Prompt k of this step draws its samples from seeds base + k*n + j: distinct
        # within a step and across steps, whichever worker serves the chunk.
        base = seed * 1_000_000

        def submit(m: Member, i: int, chunk: list[Prompt]) -> Any:
            self._bring_up_to_date(m)  # queued ahead of the chunk on the same actor: runs first
            return m.handle.generate.remote(chunk, {**sampling, "seed": base + starts[i] * int(sampling["n"])},
                                            m.version)

        def receive(m: Member, i: int, ref: Any) -> Any:
            self._finish_sync(m)
            try:
                groups = ray.get(ref)
            except StalePolicyError as stale:  # the worker was not where we thought
                m.version = stale.held if stale.held >= 0 else None
                return self._discard(len(chunks[i]))
            oldest = min((g.policy_version for g in groups), default=self.version)
            if oldest < self.version - self.max_staleness:
                m.version = oldest
                return self._discard(len(groups))
            return groups

        results = self.pool.map_chunks(chunks, submit, receive)
        return [group for chunk in results for group in chunk]

    def _discard(self, num_groups: int) -> object:
        self._counts["rollout/stale_discarded"] += num_groups
        return RETRY

    # ---------------------------------------------------------------- weights
    def push_weights(self, weights: Any, version: int) -> None:
        """Deliver `weights` (PublishedWeights from the learner's rank 0, or an object
        ref to a full state dict) to every started worker and check that each now holds
        `version`. Workers still starting load them before their first chunk."""
        self._delivery = _delivery_for(weights, self._groups)
        self.version = version
        self._counts["weight_sync/bytes"] = getattr(weights, "nbytes", 0)
        for _ in range(MAX_REPLACEMENTS_PER_CALL + 1):
            self.pool.poll()
            members = self.pool.ready()
            outcomes = self._delivery.deliver(members, version)
            dead = [(m, out) for m, out in zip(members, outcomes) if isinstance(out, RayActorError)]
            for m, out in dead:
                self.pool.lost(m, out)
            if dead:  # a broadcast breaks for everyone when one receiver dies: send again
                continue
            errors = [out for out in outcomes if isinstance(out, BaseException)]
            if errors:
                raise errors[0]
            held = list(outcomes)
            if any(v != version for v in held):
                raise RuntimeError(f"weight sync failed: generators hold versions {held}, expected {version}")
            for m in members:
                m.version, m.pending_sync = version, None
            return
        raise RuntimeError(f"weight sync to version {version}: generation workers kept dying")

    def _bring_up_to_date(self, m: Member) -> None:
        """Queue a load of the latest weights on `m` if its version is unknown or older
        than the staleness bound allows (a new worker, a replacement, a missed sync)."""
        if m.version is not None and m.version >= self.version - self.max_staleness:
            return
        if self._delivery is None:  # nothing pushed yet: every worker starts at version 0
            m.version = 0
            return
        m.pending_sync = self._delivery.catch_up(m.handle, self.version)
        m.version = self.version

    def _finish_sync(self, m: Member) -> None:
        """Surface a failed catch-up load (its own error, not the stale chunk after it)."""
        if m.pending_sync is None:
            return
        ref, m.pending_sync = m.pending_sync, None
        try:
            held = ray.get(ref)  # RayActorError (worker died) is the pool's business
        except WeightsSupersededError:  # newer weights took its shared-memory slot first:
            m.version = None            # it kept its old ones; the next chunk syncs it again
            return
        if held != m.version:
            raise RuntimeError(f"generation worker {m.index} loaded version {held}, expected {m.version}")

    # ---------------------------------------------------------------- elasticity
    def scale_to(self, num_workers: int, wait: bool = False) -> None:
        """Run `num_workers` generation workers. Returns at once: new workers serve once
        started and synced, retired ones finish their chunk first. wait=True blocks until
        the new ones have started and loaded the current weights."""
        before = self.pool.target
        self.pool.scale_to(num_workers)
        if before != num_workers:
            log.info("rollout fleet: %d -> %d generation workers", before, num_workers)
        if wait:
            self.pool.wait_ready()
            for m in self.pool.ready():
                self._bring_up_to_date(m)
            for m in self.pool.ready():
                try:
                    self._finish_sync(m)
                except RayActorError as e:
                    self.pool.lost(m, e)  # its replacement syncs before its first chunk

    def apply_scale_request(self) -> None:
        """Apply `<control_dir>/scale_request.json` if it is new (each request once)."""
        if self.control_dir is None:
            return
        try:
            request = read_scale_request(self.control_dir)
        except ScaleRequestError as e:
            log.warning("ignoring scale request: %s", e)
            return
        if request is None or request.request_id == self._applied_request:
            return
        self._applied_request = request.request_id
        try:
            self.scale_to(request.rollout_workers)
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the training run
            self.pool.target = max(1, len([m for m in self.pool.members if not m.draining]))
            log.error("could not scale the rollout fleet to %d workers (%s); running %d",
                      request.rollout_workers, e, self.pool.target)

    def pop_metrics(self) -> dict[str, float]:
        """Fleet metrics since the last call: stale groups discarded, worker counts,
        bytes of the last weight update."""
        counts, self._counts = self._counts, Counter()
        return {"rollout/stale_discarded": float(counts["rollout/stale_discarded"]),
                "rollout/workers": float(len(self.pool.ready())),
                "rollout/workers_target": float(self.pool.target),
                "rollout/worker_replacements": float(self.pool.replacements),
                **({"weight_sync/bytes": float(counts["weight_sync/bytes"])} if counts["weight_sync/bytes"] else {})}


# ------------------------------------------------------------------- weight delivery
class _Delivery:
    """How one published set of weights reaches workers: `deliver` to many at once
    (each worker's version held, or its exception), `catch_up` one late joiner (a ref)."""

    def deliver(self, members: list[Member], version: int) -> list[Any]:
        return _outcomes([self.catch_up(m.handle, version) for m in members])

    def catch_up(self, handle: Any, version: int) -> Any:
        raise NotImplementedError


class _FullState(_Delivery):
    def __init__(self, state_ref: Any):
        self.state_ref = state_ref

    def catch_up(self, handle: Any, version: int) -> Any:
        return handle.update_weights.remote(self.state_ref, version)


class _ObjectStore(_Delivery):
    def __init__(self, published: PublishedWeights):
        self.published = published

    def catch_up(self, handle: Any, version: int) -> Any:
        return handle.load_weight_buckets.remote(self.published, version)


class _SharedMemory(_Delivery):
    """Each worker reads the publisher's /dev/shm file (or, on another node, an
    object-store copy it asks the publisher for), late joiners alike."""

    def __init__(self, published: PublishedWeights):
        self.published = published

    def catch_up(self, handle: Any, version: int) -> Any:
        return handle.load_shared_weights.remote(self.published, version)


class _BroadcastGroups:
    """The fleet's current broadcast group: who is in it, under which name. A new
    member set (a worker added, retired or replaced) forms a new group."""

    def __init__(self):
        self.prefix = uuid.uuid4().hex[:8]
        self.count = itertools.count()
        self.name: str | None = None
        self.key: tuple = ()


class _Broadcast(_Delivery):
    def __init__(self, published: PublishedWeights, groups: _BroadcastGroups):
        self.published, self.groups = published, groups
        self._copy: PublishedWeights | None = None

    def deliver(self, members: list[Member], version: int) -> list[Any]:
        if not members:
            return []
        pub = self.published
        key = (pub.endpoint, tuple(members))  # Members compare by identity
        if key != self.groups.key:
            name = f"{self.groups.prefix}-{next(self.groups.count)}"
            world = len(members) + 1
            joins = [m.handle.join_weight_group.remote(pub.endpoint, name, rank + 1, world, pub.backend, pub.timeout_s)
                     for rank, m in enumerate(members)]
            opened = pub.source.open_weight_group.remote(name, world)
            outcomes = _outcomes(joins)
            if any(isinstance(out, BaseException) for out in outcomes):
                self.groups.key = ()
                ray.wait([opened], timeout=pub.timeout_s)
                return outcomes
            ray.get(opened)
            self.groups.name, self.groups.key = name, key
        sent = pub.source.broadcast_weights.remote(self.groups.name)
        outcomes = _outcomes([m.handle.receive_weights.remote(pub.buckets, version, self.groups.name)
                              for m in members])
        failed = any(isinstance(out, BaseException) for out in outcomes)
        try:
            ray.get(sent)
        except Exception:
            if not failed:
                raise
        if failed:
            self.groups.key = ()  # the group is broken for everyone: form a new one next time
        return outcomes

    def catch_up(self, handle: Any, version: int) -> Any:
        """A late joiner gets an object-store copy (a group change would need every
        member, and the others may be busy generating)."""
        if self._copy is None:
            self._copy = ray.get(self.published.source.weight_catch_up.remote())
        return handle.load_weight_buckets.remote(self._copy, version)


def _delivery_for(weights: Any, groups: _BroadcastGroups) -> _Delivery:
    if isinstance(weights, PublishedWeights):
        if weights.transport == "broadcast":
            return _Broadcast(weights, groups)
        if weights.transport == "shared_memory":
            return _SharedMemory(weights)
        return _ObjectStore(weights)
    return _FullState(weights)


def chunk_count(workers: int, chunks_per_worker: int) -> int:
    """How many chunks a call is cut into: several per worker balance load across
    workers; one worker gains nothing from them and would run two smaller vLLM batches
    one after the other."""
    return 1 if workers <= 1 else workers * chunks_per_worker


def _outcomes(refs: list[Any]) -> list[Any]:
    """Each ref's value, or the exception it raised (a dead actor: RayActorError)."""
    out: list[Any] = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - reported per worker, judged by the caller
            out.append(e)
    return out


class RayRewardFleet:
    """Reward workers: RolloutGroups in, ScoredGroups out."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2):
        self.pool, self.chunks_per_worker = pool, chunks_per_worker

    def score(self, groups: list[RolloutGroup]) -> list[ScoredGroup]:
        self.pool.poll()
        chunks = split(groups, chunk_count(self.pool.target, self.chunks_per_worker))
        results = self.pool.map_chunks(chunks, lambda m, i, chunk: m.handle.score_groups.remote(chunk))
        return [sg for chunk in results for sg in chunk]
