"""Runtime glue: the rollout and reward fleets the trainer calls.

Each fleet hands its work out in chunks over an elastic WorkerPool
(srpo_ray/runtime/worker_pool.py): dead workers are replaced and their chunks re-issued, and
the pool can be resized while a run goes (`scale_to`, or a request file written by
`python -m srpo_ray.scale`). A new rollout worker loads the current weights before it
serves. Weights reach the generators through the transport the learner published them
with (srpo_ray/weights/: its fleet side, `deliver` and `catch_up`). Rollouts from
weights older than rollout.max_staleness allows are discarded and regenerated.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ray.exceptions import RayActorError

from actors.ray_ops import RayOps
from srpo_ray.records import GroupTokens, Prompt, RolloutGroup, Sampling, ScoredGroup, ScoreRequest, join_scores
from srpo_ray.runtime.scale_request import ScaleRequestError, read_scale_request
from srpo_ray.runtime.worker_pool import MAX_REPLACEMENTS_PER_CALL, RETRY, Member, WorkerPool, is_lost_worker, split
from srpo_ray.weights.transport import (
    PublishedWeights,
    StalePolicyError,
    WeightDeliveryError,
    WeightsSupersededError,
    WeightTransport,
    outcomes,
    transport_class,
)

__all__ = ["RayRolloutFleet", "RayRewardFleet", "WorkerPool", "split"]
log = logging.getLogger(__name__)


class RayRolloutFleet:
    """Generation workers: prompts in, RolloutGroups out; weights pushed to all.

    max_staleness: a rollout whose policy version is older than the latest pushed
    version minus this is discarded and its chunk regenerated after the worker loads
    the latest weights (rollout/stale_discarded counts the groups). control_dir: where
    `python -m srpo_ray.scale` writes resize requests (the run dir); None: no requests."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2, max_staleness: int = 0,
                 control_dir: str | Path | None = None, sleep: bool = False, ops: RayOps | None = None,
                 partial: bool = False):
        """sleep: the generators share GPUs with the learner; their engines release
        their memory after each generate call and wake for the weight update (weights)
        and the next call (KV cache): vLLM's sleep mode, as verl, OpenRLHF and slime do.
        ops: the Ray calls the fleet makes (get, kill; the transports' too): tests pass
        fakes that answer or fail as a worker would. partial: rollout.partial_rollouts
        (generate calls can be paused by `interrupt` and are resumed after the push)."""
        self.pool, self.chunks_per_worker = pool, chunks_per_worker
        self.ops = ops or RayOps()
        self.max_staleness, self.control_dir, self.sleep = max_staleness, control_dir, sleep
        self.partial = partial
        self.on_pause: Callable[[], None] = lambda: None  # partial rollouts: the pipeline's pause_for_push
        self.version = 0  # the latest pushed version; the model_path weights are version 0
        self._delivery: _Published | None = None
        self._transports: dict[str, WeightTransport] = {}  # fleet sides, kept (groups live there)
        self._applied_request: str | None = None
        self._counts: Counter = Counter()
        self._load_times: list[float] = []  # the workers' loads of the last push (pop_metrics)

    # ---------------------------------------------------------------- rollouts
    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[RolloutGroup]:
        """sampling.seed: the call's (records.rollout_seed); prompt k of the call samples
        from seed + k*n, whichever worker serves its chunk. Partial rollouts: groups that
        come back paused (`interrupt`) wait in `on_pause` for the newer weights, then
        resume on any worker, as often as they are paused."""
        self.apply_scale_request()
        self.pool.poll()
        chunks = split(prompts, chunk_count(self.pool.target, self.chunks_per_worker))
        starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
        if self.sleep:
            self._wake(("weights", "kv_cache"))
        stoppable = (True,) if self.partial else ()
        groups = self._map_generation(chunks, lambda m, i, chunk: m.handle.generate_apart.options(
            num_returns=1 + 2 * len(chunk)).remote(chunk, sampling.for_prompt(starts[i]), m.version, *stoppable))
        while any(g.paused for g in groups):
            before = self.version
            self._counts["rollout/pauses"] += 1
            self.on_pause()  # the trainer pushes the weights the workers paused for
            if self.version == before:
                raise RuntimeError("generation paused for newer weights, but none were pushed")
            paused = [k for k, g in enumerate(groups) if g.paused]
            self._counts["rollout/resumed_groups"] += len(paused)
            work = [(groups[k], sampling.for_prompt(k).seed) for k in paused]
            resumed = self._map_generation(
                split(work, chunk_count(self.pool.target, self.chunks_per_worker)),
                lambda m, i, chunk: m.handle.resume_apart.options(num_returns=1 + 2 * len(chunk)).remote(
                    [g for g, _ in chunk], sampling, [seed for _, seed in chunk], m.version))
            for k, group in zip(paused, resumed):
                groups[k] = group
        if self.sleep:
            self._put_to_sleep()
        return groups

    def interrupt(self, version: int) -> None:
        """Partial rollouts: pause the workers' generation on weights older than `version`
        at their next decoding step; their calls return the paused groups (generate waits
        in on_pause, then resumes them). A worker lost meanwhile is the pool's business."""
        from actors.generation import send_interrupt

        members = self.pool.ready()
        outcomes(self.ops, [send_interrupt(m.handle, version) for m in members])

    def _map_generation(self, chunks: list[list[Any]], call: Callable[[Member, int, list[Any]], list[Any]]
                        ) -> list[RolloutGroup]:
        """`call(m, i, chunk)` (a generate_apart or resume_apart call, its refs) for each
        chunk over the pool; the groups, with their tokens and texts by reference."""
        payloads: dict[int, list[Any]] = {}  # chunk -> its groups' token and text refs (the latest try's)

        def submit(m: Member, i: int, chunk: list[Any]) -> Any:
            self._bring_up_to_date(m)  # queued ahead of the chunk on the same actor: runs first
            # tokens and texts stay in the object store, one object each per group: the
            # driver gets the summaries (the first return) and holds references to the rest
            refs = call(m, i, chunk)
            payloads[i] = refs[1:]
            return refs[0]

        def receive(m: Member, i: int, ref: Any) -> Any:
            self._finish_sync(m)
            try:
                groups = self.ops.get(ref)
            except StalePolicyError as stale:  # the worker was not where we thought
                m.version = stale.held if stale.held >= 0 else None
                return self._discard(len(chunks[i]))
            oldest = min((g.policy_version for g in groups), default=self.version)
            if oldest < self.version - self.max_staleness:
                m.version = oldest
                return self._discard(len(groups))
            refs = payloads[i]
            return [g.by_reference(refs[2 * k], refs[2 * k + 1]) for k, g in enumerate(groups)]

        results = self.pool.map_chunks(chunks, submit, receive)
        return [group for chunk in results for group in chunk]

    def fetch(self, groups: list[RolloutGroup], tokens: bool = True) -> list[RolloutGroup]:
        """The groups with their texts (and, with `tokens`, their tokens) brought here
        from the object store: only for the few a reader needs here (rollouts.jsonl, an
        evaluation report's texts)."""
        def wanted(g: RolloutGroup) -> list[Any]:
            refs = [] if isinstance(g.texts, tuple) else [g.texts]
            return refs + ([g.tokens] if tokens and not isinstance(g.tokens, GroupTokens) else [])
        refs = [r for g in groups for r in wanted(g)]
        fetched = iter(self.ops.get(refs) if refs else [])
        out = []
        for g in groups:
            texts = g.texts if isinstance(g.texts, tuple) else next(fetched)
            held = g.tokens if not tokens or isinstance(g.tokens, GroupTokens) else next(fetched)
            out.append(g.by_reference(held, tuple(texts)))
        return out

    def wake(self) -> None:
        """Every engine fully awake (before calling workers directly, e.g. token_logprobs)."""
        if self.sleep:
            self._wake(("weights", "kv_cache"))

    def _put_to_sleep(self) -> None:
        members = [m for m in self.pool.ready() if not m.asleep]
        for m, out in zip(members, outcomes(self.ops, [m.handle.sleep.remote() for m in members])):
            if is_lost_worker(out):
                self._replace(m, out)
            elif isinstance(out, BaseException):
                raise out
            else:
                m.asleep = ("weights", "kv_cache")

    def _wake(self, tags: tuple[str, ...]) -> None:
        """Bring back `tags` of every ready worker's engine memory that is asleep."""
        members = [m for m in self.pool.ready() if set(m.asleep) & set(tags)]
        refs = [m.handle.wake_up.remote([t for t in m.asleep if t in tags]) for m in members]
        for m, out in zip(members, outcomes(self.ops, refs)):
            if is_lost_worker(out):
                self._replace(m, out)
            elif isinstance(out, BaseException):
                raise out
            else:
                m.asleep = tuple(t for t in m.asleep if t not in tags)

    def _replace(self, m: Member, error: BaseException) -> None:
        """`m` will not serve again (is_lost_worker, or a broken transfer): kill its actor
        if it is still alive (a dead vLLM engine leaves a live actor holding its GPUs) and
        let the pool start a replacement."""
        if not isinstance(error, RayActorError):
            self.ops.kill(m.handle)
        self.pool.lost(m, error)

    def _discard(self, num_groups: int) -> object:
        self._counts["rollout/stale_discarded"] += num_groups
        return RETRY

    # ---------------------------------------------------------------- weights
    def push_weights(self, weights: PublishedWeights, version: int) -> None:
        """Deliver `weights` (the learner's rank 0's record) to every started worker and
        check that each now holds `version`. Workers still starting load them before
        their first chunk."""
        self._delivery = self._delivery_for(weights)
        self.version = version
        self._counts["weight_sync/bytes"] = weights.nbytes
        for _ in range(MAX_REPLACEMENTS_PER_CALL + 1):
            self.pool.poll()
            if self.sleep:
                self._wake(("weights",))  # the KV cache stays released until the next generate
            members = self.pool.ready()
            answers = self._delivery.deliver(members, version)
            lost = [(m, out) for m, out in zip(members, answers)
                    if isinstance(out, WeightDeliveryError) or is_lost_worker(out)]
            for m, out in lost:
                if isinstance(out, WeightDeliveryError):  # alive but stuck in a broken transfer
                    log.warning("generation worker %d: %s; replacing it", m.index, out)
                self._replace(m, out)
            if lost:  # a group transfer breaks for everyone when one receiver dies: send the same
                # publish again, to the replacements too (still starting now: a retry without
                # them would deliver to nobody and pass, and they would catch up later from a
                # copy the aborted send never completed)
                self.pool.wait_ready()
                continue
            if not members and not self.pool.members:  # (workers still starting catch up later)
                raise RuntimeError(f"weight sync to version {version}: no generation worker to deliver to")
            errors = [out for out in answers if isinstance(out, BaseException)]
            if errors:
                raise errors[0]
            held = list(answers)
            if any(v != version for v in held):
                raise RuntimeError(f"weight sync failed: generators hold versions {held}, expected {version}")
            for m in members:
                m.version, m.pending_sync = version, None
            # asked now, while nothing else is queued on the workers (a later call could
            # wait behind a generate call of the next collection)
            self._load_times = self._load_seconds(members)
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
            held = self.ops.get(ref)  # RayActorError (worker died) is the pool's business
        except WeightsSupersededError:  # newer weights replaced these before it loaded them:
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
        bytes of the last weight update, and the slowest worker's load of it."""
        counts, self._counts = self._counts, Counter()
        out = {"rollout/stale_discarded": float(counts["rollout/stale_discarded"]),
               "rollout/workers": float(len(self.pool.ready())),
               "rollout/workers_target": float(self.pool.target),
               "rollout/worker_replacements": float(self.pool.replacements)}
        if self.partial:
            out["rollout/pauses"] = float(counts["rollout/pauses"])
            out["rollout/resumed_groups"] = float(counts["rollout/resumed_groups"])
        if counts["weight_sync/bytes"]:
            out["weight_sync/bytes"] = float(counts["weight_sync/bytes"])
        loads, self._load_times = self._load_times, []
        if loads:
            # the generator's side of time/weight_sync: the rest is the learner's publish and RPCs
            out["time/weight_load"] = max(loads)
        return out

    def _load_seconds(self, members: list[Member]) -> list[float]:
        """Each worker's load of the push that just finished: the last of the loads it
        timed since it was last asked (earlier ones were catch-ups of a worker that joined
        between pushes, not part of this push). One that died meanwhile has none to give:
        metrics never fail a step."""
        loads = outcomes(self.ops, [m.handle.pop_load_seconds.remote() for m in members])
        return [out[-1] for out in loads if isinstance(out, list) and out]

    def _delivery_for(self, weights: PublishedWeights) -> "_Published":
        if weights.transport not in self._transports:
            transport = transport_class(weights.transport)(self.ops)
            # rollouts may be generated while the learner trains: a replacement then can
            # only load a copy made before the step, so have it made at each push
            transport.prepare_catch_up = self.max_staleness > 0
            self._transports[weights.transport] = transport
        return _Published(weights, self._transports[weights.transport])


# ------------------------------------------------------------------- weight delivery
class _Published:
    """How one published set of weights reaches workers, through its transport's fleet
    side: `deliver` to many at once (each worker's version held, or its exception),
    `catch_up` one late joiner (a ref to its load)."""

    def __init__(self, published: PublishedWeights, transport: WeightTransport):
        self.published, self.transport = published, transport

    def deliver(self, members: list[Member], version: int) -> list[Any]:
        return self.transport.deliver(self.published, members, version)

    def catch_up(self, handle: Any, version: int) -> Any:
        return self.transport.catch_up(self.published, handle, version)


def chunk_count(workers: int, chunks_per_worker: int) -> int:
    """How many chunks a call is cut into: several per worker balance load across
    workers; one worker gains nothing from them and would run two smaller vLLM batches
    one after the other."""
    return 1 if workers <= 1 else workers * chunks_per_worker


class RayRewardFleet:
    """Reward workers: RolloutGroups in, ScoredGroups out. The workers get only what they
    score: the answer key (ScoreRequest without texts) and the groups' texts by
    reference, fetched from the object store by the worker itself (no token arrays, and
    nothing through the driver); they return only RewardResults, joined back here."""

    def __init__(self, pool: WorkerPool, chunks_per_worker: int = 2):
        self.pool, self.chunks_per_worker = pool, chunks_per_worker

    def score(self, groups: list[RolloutGroup]) -> list[ScoredGroup]:
        self.pool.poll()
        work = [(ScoreRequest.key_of(g), g.texts) for g in groups]
        chunks = split(work, chunk_count(self.pool.target, self.chunks_per_worker))
        results = self.pool.map_chunks(chunks, lambda m, i, chunk: m.handle.score_texts.remote(
            [key for key, _ in chunk], [t for _, t in chunk]))
        return join_scores(groups, [r for chunk in results for r in chunk])
