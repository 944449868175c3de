"""When a step's rollouts are collected: just before the step trains (on-policy), or one
step ahead, while the previous step trains (one-step-off-policy, rollout.one_step_off).

`RolloutPipeline` is pure Python (a thread, no Ray). The trainer gives it `collect(step)`,
which draws the step's prompts from the ledger, generates, scores and records them, and
returns the step's rollouts (None when the pool is empty). With lookahead, `take(k)`
hands out step k's rollouts and at once starts collecting step k+1 in a background
thread, so generation of k+1 overlaps training of k. The trainer then calls `settle()`
before it pushes new weights: generators never change weights under a running
collection, and step k+1's rollouts come from the weights step k trained on (one
version old when step k+1 trains).

Only one collection runs at a time, and only the collecting thread touches the ledger
and the stage schedule while it runs. `may_prefetch(k)` vetoes collecting step k ahead
(past the last step, or after a step that saves a checkpoint: a checkpoint must not hold
ledger records of rollouts no step has trained on yet). When the loop ends on an error,
`close()` waits for a collection still running ahead and drops it, so no thread of a
dead run keeps using (or replacing) its workers.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class _Collection(Generic[T]):
    """One collection running in a daemon thread (a daemon, so a run that fails in the
    main thread exits without waiting for a generation nobody will use)."""

    def __init__(self, collect: Callable[[int], Optional[T]], step: int):
        self.step = step
        self._done = threading.Event()
        self._result: Optional[T] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(collect,), daemon=True,
                                        name=f"collect-step-{step}")
        self._thread.start()

    def _run(self, collect: Callable[[int], Optional[T]]) -> None:
        try:
            self._result = collect(self.step)
        except BaseException as error:  # re-raised in the trainer's thread by result()
            self._error = error
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error

    def result(self) -> Optional[T]:
        self.wait()
        return self._result


class RolloutPipeline(Generic[T]):
    def __init__(self, collect: Callable[[int], Optional[T]], lookahead: bool,
                 may_prefetch: Callable[[int], bool]):
        self._collect, self.lookahead, self._may_prefetch = collect, lookahead, may_prefetch
        self._ahead: Optional[_Collection[T]] = None

    def take(self, step: int) -> Optional[T]:
        """Step `step`'s rollouts (collected ahead, or now), or None if none are left.
        With lookahead, the next step's collection starts before this returns."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            if ahead.step != step:
                raise RuntimeError(f"rollouts were collected ahead for step {ahead.step}, "
                                   f"but step {step} asked for them")
            item = ahead.result()
        else:
            item = self._collect(step)
        if item is not None and self.lookahead and self._may_prefetch(step + 1):
            self._ahead = _Collection(self._collect, step + 1)
        return item

    def settle(self) -> None:
        """Wait until no collection is running (its rollouts stay ready for `take`).
        Raises the collection's error, if it failed."""
        if self._ahead is not None:
            self._ahead.wait()

    def close(self) -> None:
        """Wait for a collection still running ahead and drop it (rollouts and error): the
        caller is leaving, on an error of its own, and must not tear the roles down under
        a thread that still uses them (it would start replacement workers for a dead run)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(BaseException):
                ahead.wait()

    @property
    def collecting_ahead(self) -> bool:
        return self._ahead is not None
