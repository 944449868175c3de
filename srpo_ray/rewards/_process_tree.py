"""Find and end the processes below a reward child (a plug-in's or math-verify's checker).

Standard library only: _check_child.py runs as a script and imports this file by its
bare name (child_pool.py imports it as srpo_ray.rewards._process_tree).

A checker that calls become_subreaper() (Linux, prctl PR_SET_CHILD_SUBREAPER) inherits
every orphan below it, so whatever a plug-in starts stays in its process tree: a busy
forked child, or a double fork whose grandchild calls setsid and so leaves the process
group a group kill would reach. end_descendants() freezes that tree (SIGSTOP: a stopped
process cannot fork a new one), kills it (SIGKILL, which a process cannot ignore) and
reaps what became this process's children. Without /proc (not Linux) nothing is found.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
REAP_WAIT_S = 5.0  # a killed process in uninterruptible sleep (disk, NFS) exits when that returns
MAX_FREEZE_ROUNDS = 100  # a tree that keeps growing is frozen a layer per round


def become_subreaper() -> bool:
    """Make this process the reaper of orphans below it; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """`pid`'s direct children (zombies included): the kernel's per-thread lists, or a
    scan of /proc where the kernel has none (CONFIG_PROC_CHILDREN off)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended while we looked
            return _children_by_scan(pid)
        except OSError:
            continue
    return found


def descendants(pid: int, skip: frozenset[int] = frozenset()) -> list[int]:
    """Every process below `pid`, parents before children; a pid in `skip` is left out
    with everything below it."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = [c for p in frontier for c in children(p) if c not in skip and c not in found]
        found += below
        frontier = below
    return found


def end_descendants(pid: int | None = None, keep: frozenset[int] = frozenset()) -> int:
    """SIGKILL every process below `pid` (default: this process) but those in `keep` and
    theirs; reap the ones this process is parent of (as a subreaper: all of them).
    Returns how many were killed."""
    me = os.getpid()
    root = me if pid is None else pid
    frozen: list[int] = []
    for _ in range(MAX_FREEZE_ROUNDS):  # until no process below is still running
        fresh = [p for p in descendants(root, keep) if p not in frozen]
        if not fresh:
            break
        for p in fresh:
            _signal(p, signal.SIGSTOP)
        frozen += fresh
    for p in frozen:
        _signal(p, signal.SIGKILL)
    if root == me:
        _reap(keep)
    return len(frozen)


def _reap(keep: frozenset[int]) -> None:
    """Wait for the killed children of this process; the children of a killed process
    become ours (subreaper) as it dies, so look again until none is left."""
    end = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < end:
        left = [c for c in children(os.getpid()) if c not in keep]
        if not left:
            return
        for c in left:
            _signal(c, signal.SIGKILL)  # one re-parented to us after the freeze
            try:
                os.waitpid(c, os.WNOHANG)
            except ChildProcessError:
                pass  # not ours after all (reaped meanwhile, or no subreaper here)
        time.sleep(0.001)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent(int(entry)) == pid:
            found.append(int(entry))
    return found


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return int(stat.rpartition(")")[2].split()[1])
