"""An elastic pool of actors of one role, and the chunked work loop over it.

Work is handed out in chunks as workers become free (`ray.wait`), so a fast worker is
not left idle while a slow one has a queue. A worker that dies mid-call (its actor is
gone) is replaced by a fresh one from its factory and the chunk is re-issued: the call
completes with every chunk done exactly once. A worker that is alive but stops answering
(stuck in a native call, a wedged engine, a stopped process) is noticed by a deadline
per chunk, counted from when the chunk was submitted and as long as its `chunk_seconds`
says that chunk may take: it is then killed and handled as a dead one. The pool can be
resized while it works (`scale_to`): a new worker takes work once it has started (the
others keep working meanwhile); a retired worker finishes the chunk it is serving before
it is stopped. Runtime glue: its Ray calls go through `ops` (actors/ray_ops.py RayOps),
so tests drive it with fakes.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from srpo_ray.telemetry.console import actor_log_file

log = logging.getLogger(__name__)
MAX_REPLACEMENTS_PER_CALL = 3
MAX_RETRIES_PER_CHUNK = 3
RETRY = object()  # a chunk's result was refused (e.g. stale): issue the chunk again
ChunkSeconds = Callable[[Any], float]  # a chunk -> how long a worker may take to answer it


class PoolOps(Protocol):
    """The Ray calls the pool makes (actors/ray_ops.py RayOps)."""

    def get(self, refs: Any, timeout: float | None = None) -> Any: ...

    def wait(self, refs: list[Any], num_returns: int, timeout: float | None, fetch_local: bool = True) -> tuple: ...

    def kill(self, handle: Any) -> None: ...


@dataclass(eq=False)
class Member:
    """One worker of a pool. index: its slot, the factory's argument (placement bundle,
    worker index); the lowest free slot is reused. version: the policy version a
    generation worker holds (None: not known yet, sync before it serves)."""

    index: int
    handle: Any
    starting: Any = None  # the ping in flight until the actor has started
    busy: bool = False
    draining: bool = False  # retire after the current chunk
    version: int | None = None
    pending_sync: Any = None  # a weight load submitted ahead of its next chunk
    asleep: tuple[str, ...] = ()  # engine memory released (vLLM sleep tags), colocated on GPUs


class WorkerPool:
    """Actor handles of one role, resizable while work is running."""

    def __init__(self, role: str, factory: Callable[[int], Any], size: int, log_dir: str | None = None,
                 chunk_seconds: ChunkSeconds | None = None, ops: PoolOps | None = None):
        """log_dir: where the workers' output goes (<role>-<index>.log), named when one
        dies; None: Ray's worker logs. chunk_seconds: how long a worker may take to
        answer a chunk (map_chunks' default); None: no deadline, only a dead worker is
        noticed. ops: the Ray calls (default RayOps)."""
        self.role, self.factory, self.log_dir = role, factory, log_dir
        self.chunk_seconds = chunk_seconds
        self.ops = ops if ops is not None else _ray_ops()
        self.members: list[Member] = []
        self.target = 0
        self.replacements = 0  # workers lost and replaced since the pool was made
        self._losses_this_call = 0
        self._cold = True  # no call has run yet
        self.scale_to(size)

    @property
    def workers(self) -> list[Any]:
        """Handles of every live worker (started or starting)."""
        return [m.handle for m in self.members]

    def ready(self) -> list[Member]:
        """Started workers that take new work, by slot."""
        return sorted((m for m in self.members if m.starting is None and not m.draining), key=lambda m: m.index)

    def scale_to(self, size: int) -> None:
        """Start or retire workers until `size` are live; returns at once (new ones
        start in the background, busy ones retire after their chunk)."""
        if size < 1:
            raise ValueError(f"{self.role} pool size {size}: need at least one worker")
        self.target = size
        live = [m for m in self.members if not m.draining]
        for _ in range(size - len(live)):
            self._start()
        # retire the ones that cost least to lose: not started yet, then idle, then busy
        by_cost = sorted(live, key=lambda m: (m.starting is None, m.busy, -m.index))
        for m in by_cost[:max(0, len(live) - size)]:
            if m.busy:
                m.draining = True
            else:
                self._stop(m)

    def poll(self) -> None:
        """Take in the workers that have started since the last look (no waiting)."""
        starting = {m.starting: m for m in self.members if m.starting is not None}
        if starting:
            done, _ = self.ops.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in done:
                self._started(starting[ref])

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every starting worker has started (or failed and been replaced)."""
        while True:
            starting = {m.starting: m for m in self.members if m.starting is not None}
            if not starting:
                return
            done, _ = self.ops.wait(list(starting), num_returns=len(starting), timeout=timeout_s)
            if not done:
                raise TimeoutError(f"{len(starting)} {self.role} worker(s) did not start within {timeout_s} s")
            for ref in done:
                self._started(starting[ref])

    def map_chunks(self, chunks: Sequence[Any], submit: Callable[[Member, int, Any], Any],
                   receive: Callable[[Member, int, Any], Any] | None = None,
                   chunk_seconds: ChunkSeconds | None = None) -> list[Any]:
        """Run `submit(member, chunk_index, chunk) -> ref` for every chunk on whichever
        started worker is free; `receive(member, chunk_index, ref)` turns a finished ref
        into the chunk's result (default: ops.get) or RETRY. Results in chunk order.
        A worker that has not answered `chunk_seconds(chunk)` (default: the pool's)
        after the chunk was submitted is killed and replaced, and the chunk re-issued.
        The pool's first call waits until all its workers have started; later, workers
        still starting join in when ready."""
        receive = receive or (lambda member, index, ref: self.ops.get(ref))
        limit = chunk_seconds or self.chunk_seconds
        self._losses_this_call = 0
        if self._cold:  # a run starts at its configured size: the first call is start-up anyway
            self._cold = False
            self.wait_ready()
        results: list[Any] = [None] * len(chunks)
        pending = deque(range(len(chunks)))
        running: dict[Any, tuple[int, Member]] = {}
        deadlines: dict[Any, tuple[float, float]] = {}  # ref -> (when its worker is taken as hung, seconds)
        retries: Counter = Counter()
        while pending or running:
            for m in self.ready():
                if not pending:
                    break
                if not m.busy:
                    index = pending.popleft()
                    m.busy = True
                    ref = submit(m, index, chunks[index])
                    running[ref] = (index, m)
                    seconds = limit(chunks[index]) if limit else math.inf
                    deadlines[ref] = (time.monotonic() + seconds, seconds)
            starting = {m.starting: m for m in self.members if m.starting is not None}
            if not running and not starting:
                raise RuntimeError(f"no {self.role} workers left to run {len(pending)} chunk(s)")
            first_deadline = min((t for t, _ in deadlines.values()), default=math.inf)
            wait_s = None if first_deadline == math.inf else max(0.0, first_deadline - time.monotonic())
            done, _ = self.ops.wait(list(running) + list(starting), num_returns=1, timeout=wait_s)
            if not done:
                for ref in [r for r, (t, _) in deadlines.items() if t <= time.monotonic()]:
                    index, m = running.pop(ref)
                    self._hung(m, index, chunks[index], deadlines.pop(ref)[1])
                    pending.appendleft(index)
                continue
            if done[0] in starting:
                self._started(starting[done[0]])
                continue
            index, m = running.pop(done[0])
            del deadlines[done[0]]
            m.busy = False
            try:
                result = receive(m, index, done[0])
            except Exception as e:
                if not is_lost_worker(e):
                    raise
                if not _actor_died(e):
                    self.ops.kill(m.handle)  # a dead engine's actor is still alive (and holds its resources)
                self._lost(m, e)
                pending.appendleft(index)
                continue
            if result is RETRY:
                retries[index] += 1
                if retries[index] > MAX_RETRIES_PER_CHUNK:
                    raise RuntimeError(f"{self.role} chunk {index} was refused {retries[index]} times")
                pending.appendleft(index)
            else:
                results[index] = result
            if m.draining:
                self._stop(m)
        return results

    def lost(self, member: Member, error: BaseException | None = None) -> None:
        """`member`'s actor died (of `error`): drop it and start a replacement if below target."""
        self._lost(member, error)

    # ---------------------------------------------------------------- internals
    def _start(self) -> Member:
        taken = {m.index for m in self.members}
        index = next(i for i in itertools.count() if i not in taken)
        handle = self.factory(index)
        member = Member(index, handle, starting=handle.ping.remote())
        self.members.append(member)
        return member

    def _started(self, member: Member) -> None:
        try:
            self.ops.get(member.starting)
        except Exception as e:
            if not is_lost_worker(e):
                raise
            if not _actor_died(e):
                self.ops.kill(member.handle)
            self._lost(member, e)
            return
        member.starting = None
        log.info("%s worker %d started", self.role, member.index)

    def _stop(self, member: Member) -> None:
        self.members.remove(member)
        self.ops.kill(member.handle)
        log.info("%s worker %d retired", self.role, member.index)

    def _hung(self, member: Member, index: int, chunk: Any, seconds: float) -> None:
        """`member` has not answered chunk `index` within its deadline: alive but stuck
        (a dead actor's call fails at once). Kill it; it is then lost like a dead one."""
        size = f" ({len(chunk)} items)" if hasattr(chunk, "__len__") else ""
        self.ops.kill(member.handle)
        self._lost(member, TimeoutError(f"no answer to chunk {index}{size} in {seconds:.1f} s, its deadline: "
                                        f"killed, the chunk re-issued"), hung=True)

    def _lost(self, member: Member, error: BaseException | None = None, hung: bool = False) -> None:
        if member in self.members:
            self.members.remove(member)
        self.replacements += 1
        self._losses_this_call += 1
        # Ray's report carries the actor's traceback when it raised; its own output (a
        # native crash, vLLM's last words) is in its log file
        output = (f"its output: {actor_log_file(self.log_dir, self.role, member.index)}" if self.log_dir
                  else "its output: Ray's worker logs")
        if self._losses_this_call > MAX_REPLACEMENTS_PER_CALL:
            raise RuntimeError(f"{self.role} workers keep dying ({self._losses_this_call} replacements in one "
                               f"call); the last one ({output}) died of:\n{error}") from None
        log.warning("%s worker %d %s; starting a replacement (%s): %s", self.role, member.index,
                    "hung" if hung else "died", output, _last_line(error))
        if len([m for m in self.members if not m.draining]) < self.target:
            self._start()


def _ray_ops() -> PoolOps:
    from actors.ray_ops import RayOps  # here: the pool itself runs without Ray in unit tests

    return RayOps()


# Errors of a worker that will never serve again, by (module, class name), so that this
# module imports neither Ray nor vLLM: Ray's dead actor, and vLLM's dead engine
# (vllm/v1/engine/exceptions.py in 0.33: the EngineCore process is gone; the actor still
# answers, but its engine never will again).
LOST_WORKER_ERRORS = (("ray.exceptions", "RayActorError"), ("vllm.v1.engine.exceptions", "EngineDeadError"))


def is_lost_worker(error: BaseException) -> bool:
    """A worker that will never serve again: its actor died (RayActorError and its
    subclasses) or its vLLM engine did (EngineDeadError; through Ray it arrives as a
    RayTaskError that is also an instance of the cause's class, and carries it in
    `.cause`). The caller kills the actor of a dead engine (it is still alive) and
    replaces it."""
    for err in (error, getattr(error, "cause", None)):
        if isinstance(err, BaseException) and any((c.__module__, c.__name__) in LOST_WORKER_ERRORS
                                                  for c in type(err).__mro__):
            return True
    return False


def _actor_died(error: BaseException) -> bool:
    """The actor itself is gone (not only its engine): nothing is left to kill."""
    return any((c.__module__, c.__name__) == LOST_WORKER_ERRORS[0] for c in type(error).__mro__)


def _last_line(error: BaseException | None) -> str:
    """The gist of Ray's report: a traceback's last line is the exception itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no report"


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    size = max(1, math.ceil(len(items) / max(1, parts)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
