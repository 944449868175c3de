"""A small pool of child processes that run math-verify checks, with hard deadlines.

math-verify's timeouts use signal.alarm, which works only in a process's main thread
(not in threads, async Ray actors or actors with max_concurrency > 1). Each check runs
in a plain single-threaded child (_check_child.py, kind `math`) whose memory is capped
with RLIMIT_AS; the pool (child_pool.ChildPool) hands it one check at a time and kills
and replaces a child that has not answered `timeout_s + HARD_SLACK_S` after the request.
Nothing here uses signals, so the pool works from any thread.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from srpo_ray.rewards.child_pool import ChildPool, child_argv

CHILD_SCRIPT = Path(__file__).with_name("_check_child.py")
HARD_SLACK_S = 2.0
CACHE_SIZE = 8192


@dataclass(frozen=True)
class MathVerdict:
    correct: bool
    timeout: bool = False
    error: str | None = None


class MathCheckPool:
    """`check(pairs)` -> one MathVerdict per (gold, answer) pair, never blocking longer
    than about `timeout_s + HARD_SLACK_S` per check."""

    def __init__(self, processes: int, timeout_s: int, memory_mb: int, child_script: Path = CHILD_SCRIPT,
                 hard_slack_s: float = HARD_SLACK_S) -> None:
        """child_script, hard_slack_s: the checker process and the grace past timeout_s
        before it is replaced; fault tests pass a checker that hangs."""
        if not isinstance(timeout_s, int) or timeout_s < 1:
            raise ValueError(f"reward.math_timeout_s={timeout_s!r}: must be a whole number of seconds "
                             f">= 1 (math-verify's alarm only takes whole seconds)")
        if processes < 1:
            raise ValueError(f"reward.math_processes={processes}: need at least 1")
        self.timeout_s = timeout_s
        self.memory_bytes = memory_mb << 20
        self._pool = ChildPool(
            child_argv(str(child_script), self.memory_bytes, timeout_s, "math"), processes,
            deadline_s=timeout_s + hard_slack_s, label="math-check",
            start_hint=f"check that math-verify is installed (run `{sys.executable} -c 'import math_verify'` "
                       f"to see why) and reward.math_memory_mb is large enough")
        self._cache: OrderedDict[tuple[str, str], MathVerdict] = OrderedDict()

    @property
    def restarts(self) -> int:
        """Children killed and replaced so far (stuck or dead)."""
        return self._pool.restarts

    @property
    def _children(self):
        return self._pool.children

    def check(self, pairs: list[tuple[str, str]]) -> list[MathVerdict]:
        results: list[MathVerdict | None] = [None] * len(pairs)
        misses: list[int] = []
        for i, pair in enumerate(pairs):
            hit = self._cache.get(pair)
            if hit is not None:
                self._cache.move_to_end(pair)
                results[i] = hit
            else:
                misses.append(i)
        replies = self._pool.run([{"gold": pairs[i][0], "answer": pairs[i][1]} for i in misses])
        for i, msg in zip(misses, replies):
            verdict = MathVerdict(bool(msg.get("correct")), bool(msg.get("timeout")), msg.get("error"))
            if not verdict.timeout and verdict.error is None:
                self._cache[pairs[i]] = verdict
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            results[i] = verdict
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.close()
