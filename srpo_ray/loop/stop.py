"""Stopping a run early at a safe point: preemption (the SIGTERM Kubernetes and Slurm send
before they kill a job).

`StopRequest` is a flag the trainer reads between steps: once it is set, the trainer
finishes the step it is in, saves a checkpoint and returns (srpo_ray/loop/trainer.py).
`Preemption` is what the driver's signal handlers do: the first SIGTERM sets the flag
and starts the grace period; a second SIGTERM, or the grace period running out, gives
the checkpoint up by raising `PreemptionAbort` in the main thread, so the run is torn
down as on any error and exits non-zero. `preemption_signals` installs the handlers.

Handlers run in the main thread between two bytecodes of whatever it was doing (a
logging call included), so they take no lock: they set the flag, arm a timer, write
one line straight to file descriptor 2, or raise.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class PreemptionAbort(BaseException):
    """The run gave up on its checkpoint (a second SIGTERM, or the grace period ran out).
    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class StopRequest:
    """Set once (by a signal handler, or a test); read by the trainer between steps."""

    def __init__(self) -> None:
        self.reason = ""

    def request(self, reason: str) -> bool:
        """Ask for a stop; True the first time (later requests keep the first reason)."""
        if self.reason:
            return False
        self.reason = reason
        return True

    @property
    def requested(self) -> bool:
        return bool(self.reason)


class Preemption:
    """What SIGTERM and the end of the grace period do. arm_deadline(seconds): call
    `on_deadline` that much later (a SIGALRM in the driver); say: one line to the console."""

    def __init__(self, stop: StopRequest, grace_s: float, arm_deadline: Callable[[float], None],
                 say: Callable[[str], None]):
        self.stop, self.grace_s, self._arm_deadline, self._say = stop, grace_s, arm_deadline, say

    def on_sigterm(self) -> None:
        if not self.stop.request("SIGTERM"):
            raise PreemptionAbort("a second SIGTERM arrived before the checkpoint was committed")
        self._say(f"srpo_ray: SIGTERM: the run saves a checkpoint at the end of the current step and exits "
                  f"(within trainer.preempt_grace_s={self.grace_s:g} s; a second SIGTERM exits at once, "
                  f"without it)")
        self._arm_deadline(self.grace_s)

    def on_deadline(self) -> None:
        raise PreemptionAbort(f"the grace period (trainer.preempt_grace_s={self.grace_s:g} s) ran out "
                              f"before the checkpoint was committed")


def _say_to_stderr(line: str) -> None:
    os.write(2, (line + "\n").encode())  # sys.stderr's buffer may be mid-write in the main thread


@contextmanager
def preemption_signals(stop: StopRequest, grace_s: float) -> Iterator[Preemption]:
    """SIGTERM -> `stop` (and SIGALRM for the grace period) while the block runs; the
    previous handlers (Ray's, once it started) and no pending alarm afterwards. Call it
    after Ray has started (ray.init installs its own SIGTERM handler); outside the main
    thread it installs nothing."""
    preemption = Preemption(stop, grace_s, arm_deadline=lambda s: signal.setitimer(signal.ITIMER_REAL, max(s, 1e-3)),
                            say=_say_to_stderr)
    if threading.current_thread() is not threading.main_thread():  # (a driver run inside a thread)
        yield preemption  # only the main thread may install handlers; SIGTERM keeps its default
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in (
        (signal.SIGTERM, lambda *_: preemption.on_sigterm()),
        (signal.SIGALRM, lambda *_: preemption.on_deadline()))}
    try:
        yield preemption
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
