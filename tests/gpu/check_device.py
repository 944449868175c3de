"""What one GPU can show about srpo-ray's GPU paths, step by step, each printing PASS,
FAIL or SKIP with a reason (run through tests/gpu/check_device.sh, 3 minutes at most).

Every step names the packages it needs and is skipped, with that reason, where one is
missing, so a GPU image with torch alone still runs the torch steps (tests/gpu/torch_steps.py:
a bf16 FSDP2 step on a model built in code, the nccl transport's streaming send with real
CUDA events and its abort path, cuda_ipc's buffer read by another process, a one-rank NCCL
group, the log-prob head's memory). With the project's packages: a DCP round trip of the
real learner. With vLLM and Ray: the GPU tests (tests/gpu/test_gpu.py), in whatever time is
left of the budget.

    python tests/gpu/check_device.py [--part 1|2|all] [--cpu-dry-run]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]  # check_device.sh puts it on PYTHONPATH
BUDGET_S = 170.0  # the whole script, on one GPU (check_device.sh kills it at 180 s)
STARTED = time.monotonic()
RESULTS: list[tuple[str, str, str]] = []
PROJECT = ("numpy", "omegaconf", "pyarrow", "safetensors", "transformers")  # the learner's own imports


def report(step: str, status: str, reason: str) -> None:
    RESULTS.append((step, status, reason))
    print(f"{status:<4} {step}: {reason}", flush=True)


def missing(modules: tuple[str, ...]) -> list[str]:
    out = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # a blocked or broken package counts as missing
            found = False
        if not found:
            out.append(m)
    return out


def run_step(step: str, needs: tuple[str, ...], fn: Callable[..., str], *args: Any,
             cuda: bool = True, cpu: bool = False) -> bool:
    """Run `fn(*args)` unless a package it needs or CUDA is missing; True when it passed."""
    absent = missing(needs)
    if absent:
        report(step, "SKIP", f"needs {', '.join(absent)}, not importable by {sys.executable} (set PYTHON=...)")
        return False
    if cuda and not cpu and not cuda_present():
        report(step, "SKIP", "no CUDA device (torch.cuda.is_available() is False)")
        return False
    start = time.monotonic()
    try:
        reason = fn(*args)
    except Exception as e:  # noqa: BLE001 - a failed step is reported, the next still runs
        traceback.print_exc()
        report(step, "FAIL", f"{type(e).__name__}: {e}")
        return False
    report(step, "PASS", f"{reason} ({time.monotonic() - start:.1f} s)")
    return True


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- part 1

class State:
    learner: Any = None  # torch_steps' FSDP2 model (what the weight steps publish from)
    tmp = ""


def step_dcp(tmp: str, cpu: bool) -> str:
    """The project's learner (FSDPLearner, a transformers model): a train step, then a
    checkpoint (hf/ + torch.distributed.checkpoint) that reloads to identical log-probs."""
    import torch
    from torch_steps import free_port

    from srpo_ray.config.load import load_config
    from srpo_ray.learner.batch import TrainBatch
    from srpo_ray.learner.core import FSDPLearner
    from srpo_ray.models import build_tiny_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    model_dir = build_tiny_model(os.path.join(tmp, "model"), tie_word_embeddings=True, hidden=128, heads=2, layers=2)
    gpus = "0" if cpu else "1"
    cfg = load_config(None, ["learner.num_ranks=1", f"learner.gpus_per_rank={gpus}", f"rollout.gpus_per_worker={gpus}",
                             "model.dtype=" + ("bfloat16" if cpu else "auto"), "optim.lr=1e-3"])
    learner = FSDPLearner(model_dir, cfg, 0, 1)
    learner.setup()
    try:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 500, (8, 24), generator=gen)
        mask = torch.zeros(8, 24)
        mask[:, 8:] = 1
        batch = TrainBatch(ids, torch.ones_like(ids), mask, torch.randn(8, generator=gen),
                           torch.full((8, 24), -1.0) * mask)
        learner.train_step(batch, float(mask.sum()), 1.0)
        ckpt = os.path.join(tmp, "ckpt")
        learner.save_checkpoint(ckpt)
        want = learner.logprobs_of(ids[:2])
        other = FSDPLearner(model_dir, learner.cfg, 0, 1)
        other.setup()  # the process group exists already: reused
        other.load_checkpoint(ckpt)
        got = other.logprobs_of(ids[:2])
        assert torch.equal(got, want), (got - want).abs().max()
        assert other.optimizer_steps == learner.optimizer_steps == 1
        assert Path(ckpt, "hf", "config.json").exists()
    finally:
        learner.close()
    return "hf/ + learner/ written; reloaded log-probs identical, optimizer step restored"


def part1(cpu: bool = False) -> None:
    """The torch-only steps (tests/gpu/torch_steps.py), then the project learner's
    checkpoint round trip."""
    torch_only = ("torch",)
    if not missing(torch_only):
        import torch

        if torch.cuda.is_available():
            report("environment", "INFO", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                          f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s)")
    state = State()

    def step(name: str):  # imported only once run_step has found torch
        return lambda: getattr(__import__("torch_steps"), name)(state, cpu)

    trained = run_step("fsdp2_bf16_train_step", torch_only, step("fsdp2_train_step"), cpu=cpu)
    for name, fn in (("streaming_buckets", "streaming"), ("cuda_ipc_fill", "cuda_ipc"),
                     ("logprob_head_memory", "logprob_memory")):
        if cpu:
            report(name, "SKIP", "CUDA streams, events, IPC and memory statistics (--cpu-dry-run)")
        elif not trained and fn != "logprob_memory" and not missing(torch_only) and cuda_present():
            report(name, "SKIP", "needs the model of fsdp2_bf16_train_step")
        else:
            run_step(name, torch_only, step(fn))
    run_step("nccl_broadcast", torch_only, step("broadcast"), cpu=cpu)
    if "torch_steps" in sys.modules:
        sys.modules["torch_steps"].close(state)
    with tempfile.TemporaryDirectory() as tmp:
        run_step("dcp_save_load", ("torch", *PROJECT), step_dcp, tmp, cpu, cpu=cpu)


# ----------------------------------------------------------------------------- part 2

def part2(timeout_s: int) -> None:
    """tests/gpu/test_gpu.py, in what is left of the script's budget."""
    tests = {"cuda_engine_reload": "every_one_gpu_transport or sleeping_engine",
             "driver_two_steps_colocated": "driver_trains_two_steps"}
    for step, selection in tests.items():
        left = BUDGET_S - (time.monotonic() - STARTED)
        if left < 30 and not missing(("torch", "vllm", "ray", *PROJECT)):
            report(step, "SKIP", f"{left:.0f} s left of the {BUDGET_S:.0f} s budget: run "
                                 f"python -m pytest -m gpu tests/gpu/test_gpu.py -k '{selection}'")
            continue
        run_step(step, ("torch", "vllm", "ray", *PROJECT), run_pytest, selection, min(timeout_s, int(left) - 5))


def run_pytest(selection: str, timeout_s: int) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests/gpu/test_gpu.py", "-k", selection]
    try:
        done = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"over {timeout_s} s: {' '.join(cmd)}") from None
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    if done.returncode != 0 or "passed" not in tail[0]:
        print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
        raise AssertionError(tail[0])
    return tail[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("1", "2", "all"))
    ap.add_argument("--test-timeout", type=int, default=120, help="seconds per pytest run of part 2")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run what CPU can of part 1 (gloo, bf16) to check this script itself")
    args = ap.parse_args()
    if args.part in ("1", "all"):
        part1(args.cpu_dry_run)
    if args.part in ("2", "all"):
        part2(args.test_timeout)
    failed = [step for step, status, _ in RESULTS if status == "FAIL"]
    print(f"\n{len([r for r in RESULTS if r[1] == 'PASS'])} passed, {len(failed)} failed, "
          f"{len([r for r in RESULTS if r[1] == 'SKIP'])} skipped in {time.monotonic() - STARTED:.0f} s"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
