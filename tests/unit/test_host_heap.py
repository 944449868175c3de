"""learner.host_heap and rollout.host_heap: what a CPU process's freed memory does
(srpo_ray/host_heap.py).

The policy is process-wide (glibc's mallopt), so each case runs in a child process."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from srpo_ray.host_heap import resolve_heap_policy

REPO = Path(__file__).resolve().parents[2]

# A "step" writes four tensors of 40-64 MiB (over glibc's largest mmap threshold, 32 MiB,
# like a step's logits and their gradients), frees them and ends as a train step does.
_CHILD = """
import json, resource, sys
import torch
from srpo_ray.host_heap import release_free_memory, set_heap_policy
set_heap_policy(sys.argv[1])
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n << 20) for n in (12, 16, 10, 16)]  # float32: 48, 64, 40, 64 MiB
    tensors.clear()
    release_free_memory()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""

STEP_PAGES = (216 << 20) // 4096


def _faults_per_step(policy: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, policy], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap policies are glibc's mallopt")
def test_reuse_stops_faulting_after_a_few_steps_trim_faults_every_step():
    reuse, trim = _faults_per_step("reuse"), _faults_per_step("trim")
    assert reuse[0] >= STEP_PAGES // 2, reuse  # the first step's pages are new either way
    assert max(reuse[-3:]) < STEP_PAGES // 20, reuse  # the heap has grown to fit a step: reused
    assert min(trim) >= STEP_PAGES // 2, trim  # mapped afresh, faulted again, every step


def test_auto_heap_policy_reuses_on_cpu_and_trims_on_gpu():
    assert resolve_heap_policy("auto", on_gpu=False) == "reuse"
    assert resolve_heap_policy("auto", on_gpu=True) == "trim"
    assert resolve_heap_policy("compact", on_gpu=False) == "compact"
    with pytest.raises(ValueError, match="learner.host_heap='fast'"):
        resolve_heap_policy("fast", on_gpu=False)


