"""When rollouts are collected, and when new weights reach the generators: synchronous
(k = 0), one step off (k = 1) or up to k steps ahead of training (rollout.steps_ahead),
one code path for all three.

`RolloutPipeline` is pure Python (one collector thread, no Ray). The trainer gives it
`collect(step)` (draw the step's prompts from the ledger, generate, score, record; the
step's rollouts, or None when the pool is empty) and `push()` (publish the learner's
weights and deliver them to the generators). The collector thread collects steps in
order, one at a time, so only it touches the ledger and the stage schedule, and every
group is recorded in the epoch it was drawn in, before the next draw. Rules:

- Weights never change under a running collection: `push` runs in the trainer's thread
  only while the collector is idle between collections, and the collector waits for it.
  With partial rollouts (`interrupt` given), a step that trained while a collection runs
  interrupts it: the generators pause, the collection waits in `pause_for_push` (called
  by the rollout fleet), the push runs, and the paused samples resume on the new weights.
- Admission (AReaL's rule, per step): collection j starts only if the step can train
  within k versions of the weights that sample it. The learner trains step j at most
  at version v_learner + (j - 1 - trained), so the generators' version must be at
  least that minus k; otherwise the collector waits for a push. Nothing that was
  admitted is ever discarded for its age.
- Freshness: at a boundary where the learner holds newer weights and is not training
  (it is between steps), the collector waits for the trainer to push them first.
- The next collection is decided in the same hold of the lock that records the one
  before, so with k <= 1 which weights a step samples never depends on thread timing.
- Barriers (the trainer's `may_start(step, done)`): no collection past the last step, or
  past a step that saves a checkpoint before that step is done (a checkpoint never
  holds untrained rollouts), or once a stop is requested; `hold()` keeps the collector
  idle while the trainer evaluates on the generators.

With k = 0 this is the synchronous loop (push, then collect the next step); with k = 1
step k+1 is collected while step k trains, from the weights step k started from; both
run exactly as before this class generalised them. With k >= 2 which steps see which
weights depends on timing. On an error, `close()` waits for a collection still running
and drops it, so no thread of a dead run keeps using (or replacing) its workers.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")
BLOCKED = object()  # take(): the step cannot be collected (may_start says no: a stop was requested)


class RolloutPipeline(Generic[T]):
    def __init__(self, collect: Callable[[int], Optional[T]], push: Callable[[], None], steps_ahead: int,
                 may_start: Callable[[int, int], bool], version: int, trained: int,
                 interrupt: Optional[Callable[[int], None]] = None):
        """version: the learner's (and the generators') policy version now; trained: the
        last step trained (the run's step, resumed or 0). interrupt(version): partial
        rollouts, pause the generators' work on older weights (the fleet's `interrupt`)."""
        self._interrupt = interrupt
        self._paused = False  # the collection waits in pause_for_push
        self._collect, self._push, self.steps_ahead, self._may_start = collect, push, steps_ahead, may_start
        self._cond = threading.Condition()
        self._ready: dict[int, Optional[T]] = {}
        self._error: Optional[BaseException] = None
        self._next = trained + 1  # the step the collector collects next
        self._collecting = False
        self._trained = self._done = trained
        self._learner_version = self._generator_version = version
        self._training = self._pushing = self._held = self._closing = self._finished = False
        self._waiting = False  # the collector waits for its next step to be allowed
        self._idle = {"generator": 0.0, "learner": 0.0}
        self._idle_since = time.perf_counter()
        self._thread: Optional[threading.Thread] = None

    # ---- the trainer's side ---------------------------------------------------------
    def take(self, step: int) -> Optional[T] | object:
        """Step `step`'s rollouts (None when no prompts are left; BLOCKED when `may_start`
        refuses the step), waiting for them and pushing new weights while the collector
        waits for them."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="rollout-collector")
                self._thread.start()
            waited = time.perf_counter()
            while step not in self._ready:
                self._raise_error()
                if self._finished:
                    raise RuntimeError(f"no rollouts for step {step}: the collector stopped at step {self._next}")
                if self._push_if_wanted():
                    continue
                if step == self._next and not self._collecting and not self._may_start(step, self._done):
                    return BLOCKED
                self._cond.wait()
            self._idle["learner"] += time.perf_counter() - waited
            return self._ready.pop(step)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Around the learner's update: the collector does not wait for fresher weights."""
        with self._cond:
            self._training = True
            self._start_if_allowed()  # no fresher weights to wait for while the learner trains
        try:
            yield
        finally:
            with self._cond:
                self._training = False

    def trained(self, step: int, version: int, hold: bool = False) -> None:
        """Step `step` has trained; the learner is at `version`. Pushes it now if the
        collector is idle, or as soon as it is when the next step's rollouts are not
        ready yet (the learner would wait for them anyway). hold: keep the collector
        idle, after the push, until `done(step)` (the trainer evaluates on the generators)."""
        with self._cond:
            self._trained, self._learner_version, self._held = step, version, hold
            self._start_if_allowed()
            waited = time.perf_counter()
            if self._interrupt is not None and self._collecting and not hold and not self._paused:
                self._cond.release()
                try:
                    self._interrupt(version)
                finally:
                    self._cond.acquire()
                while self._collecting and not self._paused and self._error is None:
                    self._cond.wait()
            while (self._collecting and not self._paused and (hold or step + 1 not in self._ready)
                   and self._error is None):
                self._cond.wait()
            self._idle["learner"] += time.perf_counter() - waited
            self._push_if_wanted()

    def done(self, step: int) -> None:
        """Step `step` is over (evaluated, saved): the barriers before it are lifted."""
        with self._cond:
            self._done, self._held = step, False
            self._start_if_allowed()

    @property
    def holds_untrained(self) -> bool:
        """Whether a collection is running or collected rollouts wait to be trained."""
        with self._cond:
            return self._collecting or any(item is not None for item in self._ready.values())

    def pop_idle(self) -> dict[str, float]:
        """Seconds the generators (collector) and the learner (trainer) waited on the other
        since the last call: time/generator_idle, time/learner_wait."""
        with self._cond:
            now = time.perf_counter()
            if not self._collecting:
                self._idle["generator"] += now - self._idle_since
                self._idle_since = now
            idle, self._idle = self._idle, {"generator": 0.0, "learner": 0.0}
        return {"time/generator_idle": idle["generator"], "time/learner_wait": idle["learner"]}

    def close(self) -> None:
        """Stop collecting: wait for a collection still running and drop everything (the
        caller is leaving, on an error of its own or at the run's end)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ---- the collector thread ----------------------------------------------------------
    def pause_for_push(self) -> None:
        """(In a collection; the rollout fleet's on_pause.) The generators paused for the
        learner's newer weights: let the trainer push them, and return once it has."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            try:
                while (self._learner_version > self._generator_version and not self._closing
                       and self._error is None):
                    self._cond.wait()
            finally:
                self._paused = False

    def _run(self) -> None:
        with self._cond:
            step = self._wait_for_next()
        while step is not None:
            try:
                item = self._collect(step)
            except BaseException as error:  # re-raised in the trainer's thread
                with self._cond:
                    self._error, self._collecting, self._finished = error, False, True
                    self._idle_since = time.perf_counter()
                    self._cond.notify_all()
                return
            with self._cond:  # the next step is decided in the same hold of the lock, so
                # which weights it samples does not depend on how fast this thread wakes
                self._ready[step], self._next, self._collecting = item, step + 1, False
                self._idle_since = time.perf_counter()
                self._cond.notify_all()
                step = self._wait_for_next() if item is not None else None  # None: no prompts left
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def _wait_for_next(self) -> Optional[int]:
        """(Under the lock) the next step to collect, once it may start; None on close.
        The start is decided by `_start_if_allowed`, called by whichever thread changed
        what it depends on, in that same hold of the lock: a trainer that goes on (trains,
        pushes) before this thread wakes cannot change which weights the step samples."""
        self._waiting = True
        self._start_if_allowed()
        while not self._collecting:
            if self._closing:
                return None
            self._cond.wait()
        self._waiting = False
        return self._next

    def _start_if_allowed(self) -> None:
        if self._waiting and not self._collecting and self._may_collect():
            self._collecting = True
            self._idle["generator"] += time.perf_counter() - self._idle_since
            self._cond.notify_all()

    def _may_collect(self) -> bool:
        step = self._next
        if self._closing or self._held or self._pushing or not self._may_start(step, self._done):
            return False
        # the version step `step` trains at, if every step before it learns
        at_train = self._learner_version + (step - 1 - self._trained)
        if at_train - self._generator_version > self.steps_ahead:
            return False  # admission: only a push makes this step trainable in time
        fresher = self._learner_version > self._generator_version
        return not (fresher and not self._training)

    # ---- helpers (under the lock) --------------------------------------------------------
    def _push_if_wanted(self) -> bool:
        """Push the learner's newer weights if the collector is idle (or its collection
        paused for them); True if it did."""
        if (self._collecting and not self._paused) or self._pushing or \
                self._learner_version <= self._generator_version:
            return False
        version, self._pushing = self._learner_version, True
        try:
            self._cond.release()
            try:
                self._push()
            finally:
                self._cond.acquire()
            self._generator_version = version
        finally:
            self._pushing = False
            self._start_if_allowed()
            self._cond.notify_all()
        return True

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
