"""What freed host memory does in a process that runs torch on the CPU, a learner rank or
a generation worker (glibc's malloc; no torch here).

torch's CPU allocator is plain malloc. By default glibc serves blocks over its mmap
threshold (at most 32 MiB: logits, their gradients) with fresh mappings, so a CPU train
step page-faults every such block in again: 1.1-4.8 million faults and 7-26 s of kernel
time in a SmolLM2-135M step of 31-110 s; a CPU vLLM engine's logits, 0.4-2.8 million
faults in a sampling call of a minute. The policies (learner.host_heap, rollout.host_heap):

- reuse (the default on CPU): every block comes from the heap, never trimmed. Once
  the heap has grown to fit a step (2-5 steps) nothing is faulted again, and a train
  step is 13-22% faster, a sampling call 6-8%; the process keeps its peak memory.
- trim (the default on GPU): glibc's defaults; a learner also hands the freed heap back
  after every step (malloc_trim).
- compact: every block of 1 MiB or more mapped alone and returned when freed: the
  lowest peak (fragmentation otherwise raised a step's peak by 1-2.5 GB per rank,
  bench/bench_learner_memory.py), the slowest step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

# glibc mallopt parameters (malloc.h) and the values the heap policies give them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
HEAP_POLICIES = ("auto", "reuse", "trim", "compact")
_trim_after_step = True


def resolve_heap_policy(policy: str, on_gpu: bool, key: str = "learner.host_heap") -> str:
    """A host_heap setting (`key`: learner.host_heap or rollout.host_heap) with `auto`
    decided: reuse on CPU (the big tensors live in host memory), trim on GPU (they do not)."""
    if policy not in HEAP_POLICIES:
        raise ValueError(f"{key}={policy!r}: must be one of {', '.join(HEAP_POLICIES)}")
    if policy == "auto":
        return "trim" if on_gpu else "reuse"
    return policy


def set_heap_policy(policy: str) -> None:
    """Apply a resolved learner.host_heap policy to this process (see the module
    docstring); call it before the step's big allocations. glibc only: elsewhere the
    C library's defaults stay and release_free_memory only collects garbage."""
    global _trim_after_step
    _trim_after_step = policy != "reuse"
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return
    if policy == "reuse":
        _LIBC.mallopt(_M_MMAP_MAX, 0)  # no block gets its own mapping: all come from the heap
        _LIBC.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (glibc's documented value)
    elif policy == "compact":
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Collect garbage and, unless the heap policy is `reuse`, return the heap glibc
    holds free to the OS (malloc_trim; a no-op on other C libraries)."""
    gc.collect()
    if _LIBC is not None and _trim_after_step:
        _LIBC.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
