"""The records a sandbox run produces and the worker side of the harness protocol
(see _harness.py): one _SandboxRun reads the result pipe of one sandbox process,
answers each case on the control pipe, and enforces the hard wall-clock backstop."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

STDERR_CAP = 2000
DIAG_CAP = 8192


@dataclass(frozen=True)
class SandboxLimits:
    case_timeout_s: float = 2.0
    """Wall-clock limit of one test case (RLIMIT_CPU is this, rounded up, + 1 s)."""
    total_timeout_s: float = 10.0
    """Wall-clock limit of all cases of one program."""
    memory_bytes: int = 512 << 20
    """RLIMIT_AS of each process the program starts."""
    max_processes: int = 32
    """RLIMIT_NPROC (processes + threads of the sandbox's uid, the harness included)."""
    max_open_files: int = 64
    tmp_bytes: int = 64 << 20
    """Size of the private writable /tmp."""


@dataclass(frozen=True)
class CaseInput:
    """One case as the harness sees it: never the expected output."""

    input: str
    functional: bool
    output_cap: int
    """Bytes of stdout (or of the returned JSON) kept; more counts as truncated."""


@dataclass
class CaseOutcome:
    status: str  # "exited" | "timeout"
    exit_code: int | None
    signal: int | None
    stdout: str
    truncated: bool
    returned: str | None  # functional: JSON text of the return value
    stderr: str
    seconds: float

    @property
    def ran_cleanly(self) -> bool:
        return self.status == "exited" and self.exit_code == 0 and not self.truncated


@dataclass(frozen=True)
class ProgramJob:
    code: str
    cases: tuple[CaseInput, ...]
    fn_name: str | None = None


@dataclass
class RunOutcome:
    """Outcomes of one program's cases that ran, in order; `error` names a sandbox-level
    failure (start-up, harness death, backstop kill). Cases that never ran are absent."""

    cases: list[CaseOutcome] = field(default_factory=list)
    error: str | None = None
    stopped_early: bool = False


# on_case(program index, case index, outcome) -> True to run the program's next case.
OnCase = Callable[[int, int, CaseOutcome], bool]


class SandboxRun:
    """Drives one sandbox process running `batch` (pairs of (index into outcomes, job))."""

    def __init__(self, batch: list[tuple[int, ProgramJob]], outcomes: list[RunOutcome],
                 on_case: OnCase | None, max_line: int, program_limit_s: float) -> None:
        self.batch, self.outcomes, self.on_case = batch, outcomes, on_case
        self.max_line, self.program_limit_s = max_line, program_limit_s
        self.current: int | None = None  # position in batch of the running program
        self.settled = 0
        self.done = False

    def fail_all(self, error: str) -> int:
        for index, _ in self.batch:
            self.outcomes[index].error = error
        return len(self.batch)

    def drive(self, proc: subprocess.Popen, result_r: int, control_w: int, info_r: int, name: str) -> int:
        """Run to the end. -> how many programs of the batch (from its start) are settled."""
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(result_r, selectors.EVENT_READ, "result")
        sel.register(info_r, selectors.EVENT_READ, "info")
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "diag")
        pending, info, diag = bytearray(), bytearray(), bytearray()
        deadline = time.monotonic() + self.program_limit_s  # start-up counts as a program
        error: str | None = None
        try:
            # After "done" keep reading to EOF: the pipes close when the wrapper exits,
            # so the wait below returns at once instead of polling for the exit.
            while sel.get_map() and error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    error = "killed at the hard wall-clock limit"
                    break
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                    elif key.data == "info":
                        info += chunk[: 4096 - len(info)]
                    elif key.data == "diag":
                        diag = (diag + chunk)[-DIAG_CAP:]
                    else:
                        pending += chunk
                        error, moved = self._take_lines(pending, control_w)
                        if moved:
                            deadline = time.monotonic() + self.program_limit_s
                        if error:
                            break
        finally:
            sel.close()
            clean = self.done and error is None
            orphans: set[int] = set()
            if not clean:
                # A killed wrapper can leave its sandbox PID 1 behind, reparented to us
                # (a subreaper): note it now to reap it after. After a clean exit the
                # wrapper has reaped it and the pid may be reused, so leave it alone.
                orphans = set(child_pids(proc.pid)) | {p for p in [child_pid(info)] if p}
                kill_group(proc)
            wait_and_reap(proc, orphans)
        if self.done and error is None:
            return len(self.batch)
        if error is None:
            tail = diag.decode("utf-8", "replace").strip()[-1000:]
            error = (f"{name} ended early (exit status {proc.returncode})"
                     + (f": {tail}" if tail else ""))
        if self.current is not None:
            self.outcomes[self.batch[self.current][0]].error = error
            return self.current + 1
        return self.settled if self.settled else self.fail_all(error)

    def _take_lines(self, pending: bytearray, control_w: int) -> tuple[str | None, bool]:
        """Handle complete lines. -> (protocol error or None, a program began or ended)."""
        moved = False
        while True:
            end = pending.find(b"\n")
            if end < 0:
                return ("harness result line too long" if len(pending) > self.max_line else None), moved
            line = bytes(pending[:end])
            del pending[: end + 1]
            try:
                moved |= self._handle(json.loads(line), control_w)
            except (ValueError, TypeError, AttributeError, KeyError) as e:
                return f"harness protocol error: {e}", moved
            if self.done:
                return None, moved

    def _handle(self, msg: dict, control_w: int) -> bool:
        if msg.get("done") is True:
            if self.current is not None or self.settled != len(self.batch):
                raise ValueError("done before every program ended")
            self.done = True
            return False
        p = msg["p"]
        if msg.get("begin") is True:
            if self.current is not None or p != self.settled:
                raise ValueError(f"program {p} began out of order")
            self.current = p
            return True
        if p != self.current:
            raise ValueError(f"message for program {p} while {self.current} runs")
        index, job = self.batch[p]
        outcome = self.outcomes[index]
        if msg.get("end") is True:
            self.current = None
            self.settled += 1
            return True
        if msg.get("i") != len(outcome.cases) or len(outcome.cases) >= len(job.cases):
            raise ValueError(f"unexpected case index {msg.get('i')!r}")
        case = case_from_message(msg)
        outcome.cases.append(case)
        go_on = self.on_case is None or self.on_case(index, len(outcome.cases) - 1, case)
        if not go_on:
            outcome.stopped_early = True
        try:
            os.write(control_w, b"c" if go_on else b"s")
        except OSError:
            pass  # the harness is gone; the result pipe's EOF ends the run
        return False


def case_from_message(msg: dict) -> CaseOutcome:
    def opt_int(v):
        return None if v is None else int(v)

    status = msg["status"]
    if status not in ("exited", "timeout"):
        raise ValueError(f"unknown status {status!r}")
    returned = msg.get("returned")
    return CaseOutcome(status=status, exit_code=opt_int(msg.get("exit")), signal=opt_int(msg.get("signal")),
                       stdout=str(msg.get("stdout", "")), truncated=bool(msg.get("truncated")),
                       returned=None if returned is None else str(returned),
                       stderr=str(msg.get("stderr", ""))[-STDERR_CAP:],
                       seconds=float(msg.get("seconds", 0.0)))


def child_pid(info: bytearray) -> int | None:
    try:
        return int(json.loads(bytes(info))["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group is proc's pid
    except (ProcessLookupError, PermissionError):
        pass


def child_pids(pid: int) -> list[int]:
    """Current children of `pid` (via /proc; empty if it is gone)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def wait_and_reap(proc: subprocess.Popen, orphans: set[int]) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    end = time.monotonic() + 5
    pending = set(orphans)
    while pending and time.monotonic() < end:
        for pid in list(pending):
            try:
                # Only a child of ours can be signalled safely: its pid cannot be reused
                # before we reap it. Anyone else's pid is left alone.
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                os.kill(pid, signal.SIGKILL)
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pending.discard(pid)
            except ChildProcessError:
                pending.discard(pid)  # not ours: its own parent reaps it
            except ProcessLookupError:
                pass
        if pending:
            time.sleep(0.002)
