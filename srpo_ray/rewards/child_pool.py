"""A small pool of plain child processes that answer requests one at a time, each under
a hard deadline: the math checker and reward plug-ins run here (srpo_ray/rewards/
_check_child.py is the child; math_pool.py and plugins.py are the two users).

Each child is a single-threaded process of its own session whose memory is capped with
RLIMIT_AS (the child sets it). The pool hands a child one request at a time and kills
(its whole process group) and replaces a child that has not answered `deadline_s` after
the request, or that died: the request then gets {"timeout": True} or {"error": "checker
process died"}. Processes a request starts end with it: the child kills them before it
replies, and a killed child's die with it (_process_tree.py). Nothing here uses
signals, so the pool works from any thread.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque

from srpo_ray.rewards._process_tree import end_descendants

START_TIMEOUT_S = 120.0
DIED = "checker process died"


class _Child:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        self.buffer = bytearray()
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # index of the request it is working on
        self.deadline = 0.0

    def send(self, message: dict) -> None:
        # default=str: values JSON cannot carry (timestamps, bytes) travel as strings
        data = (json.dumps(message, default=str) + "\n").encode("utf-8")
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
                message = json.loads(line)
            except ValueError:
                continue  # not ours: only protocol lines matter
            if isinstance(message, dict):
                messages.append(message)
        return messages

    def kill(self) -> None:
        if self.proc.poll() is None:  # (once reaped, its pid may be another process's)
            os.kill(self.proc.pid, signal.SIGSTOP)  # frozen, it starts nothing while its tree is ended
            # what a plug-in started, escapees from the group (setsid) included: found below
            # the child (a subreaper) before its death hands them to init
            end_descendants(self.proc.pid)
        try:  # the whole group: a plug-in may have started processes of its own
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
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


class ChildPool:
    """`run(requests)` -> one reply dict per request (the child's reply without its
    "id"), never blocking longer than about `deadline_s` per request and child.
    `label` names the children in errors ("math-check"); `start_hint` says what to do
    when one cannot start."""

    def __init__(self, argv: list[str], processes: int, deadline_s: float, label: str, start_hint: str) -> None:
        self.argv, self.deadline_s, self.label, self.start_hint = argv, deadline_s, label, start_hint
        self.children = [_Child(argv) for _ in range(processes)]
        self.restarts = 0
        self._wait_ready()

    def run(self, requests: list[dict]) -> list[dict]:
        replies: list[dict | None] = [None] * len(requests)
        queue: deque[int] = deque(range(len(requests)))
        with selectors.DefaultSelector() as sel:
            for child in self.children:
                sel.register(child.fd, selectors.EVENT_READ, child)
            while queue or any(c.job is not None for c in self.children):
                for child in self.children:
                    if child.ready and child.job is None and queue:
                        i = queue.popleft()
                        self._assign(child, i, requests[i])
                now = time.monotonic()
                deadlines = [c.deadline for c in self.children if c.job is not None]
                deadlines += [c.started + START_TIMEOUT_S for c in self.children if not c.ready]
                wait = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in sel.select(wait):
                    child = key.data
                    messages = child.read_lines()
                    if messages is None:
                        self._finish(replies, child, {"error": DIED})
                        self._replace(sel, child)
                        continue
                    for msg in messages:
                        self._handle(replies, child, msg)
                now = time.monotonic()
                for child in list(self.children):
                    if child.job is not None and now > child.deadline:
                        self._finish(replies, child, {"timeout": True})
                        self._replace(sel, child)
                    elif not child.ready and now > child.started + START_TIMEOUT_S:
                        raise RuntimeError(f"a {self.label} process did not start within {START_TIMEOUT_S:.0f} s; "
                                           f"the host is overloaded or {self.start_hint}")
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        for child in self.children:
            child.kill()
        self.children = []

    # -- internals ----------------------------------------------------------------------
    def _assign(self, child: _Child, i: int, request: dict) -> None:
        child.job = i
        child.deadline = time.monotonic() + self.deadline_s
        try:
            child.send({**request, "id": i})
        except (BrokenPipeError, OSError):
            pass  # the read side sees EOF and replaces it

    def _handle(self, replies, child: _Child, msg: dict) -> None:
        if "fatal" in msg:
            raise RuntimeError(f"{self.label} process failed to start: {msg['fatal']}; {self.start_hint}")
        if msg.get("ready"):
            child.ready = True
            return
        if child.job is None or msg.get("id") != child.job:
            return  # a late answer to a request we already gave up on
        msg.pop("id")
        self._finish(replies, child, msg)

    @staticmethod
    def _finish(replies, child: _Child, reply: dict) -> None:
        if child.job is not None:
            replies[child.job] = reply
            child.job = None

    def _replace(self, sel: selectors.BaseSelector, child: _Child) -> None:
        sel.unregister(child.fd)
        child.kill()
        fresh = _Child(self.argv)
        self.children[self.children.index(child)] = fresh
        sel.register(fresh.fd, selectors.EVENT_READ, fresh)
        self.restarts += 1

    def _wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            for child in self.children:
                sel.register(child.fd, selectors.EVENT_READ, child)
            while not all(c.ready for c in self.children):
                left = end - time.monotonic()
                if left <= 0:
                    self.close()
                    raise RuntimeError(f"{self.label} processes did not start within {START_TIMEOUT_S:.0f} s")
                for key, _ in sel.select(left):
                    child = key.data
                    messages = child.read_lines()
                    if messages is None:
                        code = child.proc.poll()
                        self.close()
                        raise RuntimeError(f"a {self.label} process exited during start-up (status {code}); "
                                           f"{self.start_hint}")
                    for msg in messages:
                        try:
                            self._handle([], child, msg)
                        except RuntimeError:
                            self.close()
                            raise
                    if child.ready:
                        sel.unregister(child.fd)


def child_argv(script: str, memory_bytes: int, timeout_s: float, *args: str) -> list[str]:
    """The command line of one child: this interpreter, the script, its caps, its args."""
    return [sys.executable, script, str(memory_bytes), str(timeout_s), *args]
