"""A small pool of child processes that run math-verify checks, with hard deadlines.

math-verify's timeouts use signal.alarm, which works only in a process's main thread
(not in threads, async Ray actors or actors with max_concurrency > 1). Each child is a
plain single-threaded process (_math_child.py) whose memory is capped with RLIMIT_AS;
the pool hands it one check at a time and kills and replaces a child that has not
answered `timeout_s + HARD_SLACK_S` after the request. Nothing here uses signals, so
the pool works from any thread.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

CHILD_SCRIPT = Path(__file__).with_name("_math_child.py")
HARD_SLACK_S = 2.0
START_TIMEOUT_S = 120.0
CACHE_SIZE = 8192


@dataclass(frozen=True)
class MathVerdict:
    correct: bool
    timeout: bool = False
    error: str | None = None


class _Child:
    def __init__(self, memory_bytes: int, timeout_s: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD_SCRIPT), str(memory_bytes), str(timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        self.buffer = bytearray()
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index of the check it is working on
        self.deadline = 0.0

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        self.proc.stdin.write(data)  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def read_lines(self) -> list[dict] | None:
        """New complete messages, or None at EOF (the child died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, rest = self.buffer.split(b"\n")
        self.buffer = bytearray(rest)
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue  # not ours: only protocol lines matter
        return messages

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, BrokenPipeError):
                pass


class MathCheckPool:
    """`check(pairs)` -> one MathVerdict per (gold, answer) pair, never blocking longer
    than about `timeout_s + HARD_SLACK_S` per check."""

    def __init__(self, processes: int, timeout_s: int, memory_mb: int) -> None:
        if not isinstance(timeout_s, int) or timeout_s < 1:
            raise ValueError(f"reward.math_timeout_s={timeout_s!r}: must be a whole number of seconds "
                             f">= 1 (math-verify's alarm only takes whole seconds)")
        if processes < 1:
            raise ValueError(f"reward.math_processes={processes}: need at least 1")
        self.timeout_s = timeout_s
        self.memory_bytes = memory_mb << 20
        self._children = [_Child(self.memory_bytes, timeout_s) for _ in range(processes)]
        self._cache: OrderedDict[tuple[str, str], MathVerdict] = OrderedDict()
        self.restarts = 0
        self._wait_ready()

    def check(self, pairs: list[tuple[str, str]]) -> list[MathVerdict]:
        results: list[MathVerdict | None] = [None] * len(pairs)
        queue: deque[int] = deque()
        for i, pair in enumerate(pairs):
            hit = self._cache.get(pair)
            if hit is not None:
                self._cache.move_to_end(pair)
                results[i] = hit
            else:
                queue.append(i)
        with selectors.DefaultSelector() as sel:
            for child in self._children:
                sel.register(child.fd, selectors.EVENT_READ, child)
            while queue or any(c.job is not None for c in self._children):
                for child in self._children:
                    if child.ready and child.job is None and queue:
                        i = queue.popleft()
                        self._assign(child, i, pairs[i])
                now = time.monotonic()
                deadlines = [c.deadline for c in self._children if c.job is not None]
                deadlines += [c.started + START_TIMEOUT_S for c in self._children if not c.ready]
                wait = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in sel.select(wait):
                    child = key.data
                    messages = child.read_lines()
                    if messages is None:
                        self._finish(results, pairs, child, MathVerdict(False, error="checker process died"))
                        self._replace(sel, child)
                        continue
                    for msg in messages:
                        self._handle(results, pairs, child, msg)
                now = time.monotonic()
                for child in list(self._children):
                    if child.job is not None and now > child.deadline:
                        self._finish(results, pairs, child, MathVerdict(False, timeout=True))
                        self._replace(sel, child)
                    elif not child.ready and now > child.started + START_TIMEOUT_S:
                        raise RuntimeError("a math-check process did not start within "
                                           f"{START_TIMEOUT_S:.0f} s; the host is overloaded or "
                                           "math-verify cannot be imported")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for child in self._children:
            child.kill()
        self._children = []

    # -- internals ----------------------------------------------------------------------
    def _assign(self, child: _Child, i: int, pair: tuple[str, str]) -> None:
        child.job = i
        child.deadline = time.monotonic() + self.timeout_s + HARD_SLACK_S
        try:
            child.send({"id": i, "gold": pair[0], "answer": pair[1]})
        except (BrokenPipeError, OSError):
            pass  # the read side sees EOF and replaces it

    def _handle(self, results, pairs, child: _Child, msg: dict) -> None:
        if "fatal" in msg:
            raise RuntimeError(f"math-check process failed to start: {msg['fatal']}; check that "
                               f"math-verify is installed and reward.math_memory_mb is large enough")
        if msg.get("ready"):
            child.ready = True
            return
        if child.job is None or msg.get("id") != child.job:
            return  # a late answer to a request we already gave up on
        verdict = MathVerdict(bool(msg.get("correct")), bool(msg.get("timeout")), msg.get("error"))
        if not verdict.timeout and verdict.error is None:
            self._cache[pairs[child.job]] = verdict
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._finish(results, pairs, child, verdict)

    @staticmethod
    def _finish(results, pairs, child: _Child, verdict: MathVerdict) -> None:
        if child.job is not None:
            results[child.job] = verdict
            child.job = None

    def _replace(self, sel: selectors.BaseSelector, child: _Child) -> None:
        sel.unregister(child.fd)
        child.kill()
        fresh = _Child(self.memory_bytes, self.timeout_s)
        self._children[self._children.index(child)] = fresh
        sel.register(fresh.fd, selectors.EVENT_READ, fresh)
        self.restarts += 1

    def _wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            for child in self._children:
                sel.register(child.fd, selectors.EVENT_READ, child)
            while not all(c.ready for c in self._children):
                left = end - time.monotonic()
                if left <= 0:
                    self.close()
                    raise RuntimeError(f"math-check processes did not start within {START_TIMEOUT_S:.0f} s")
                for key, _ in sel.select(left):
                    child = key.data
                    messages = child.read_lines()
                    if messages is None:
                        code = child.proc.poll()
                        self.close()
                        raise RuntimeError(f"a math-check process exited during start-up (status {code}); "
                                           f"run `{sys.executable} -c 'import math_verify'` to see why")
                    for msg in messages:
                        try:
                            self._handle([], [], child, msg)
                        except RuntimeError:
                            self.close()
                            raise
                    if child.ready:
                        sel.unregister(child.fd)
