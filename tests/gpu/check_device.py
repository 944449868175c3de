"""What one GPU can show about srpo-ray's GPU paths, step by step, each printing PASS,
FAIL or SKIP with a reason (run through tests/gpu/check_device.sh).

Part 1 needs only torch, omegaconf, pyarrow, safetensors and transformers (no vLLM, no
Ray): FSDP2 over NCCL in bf16 with fp32 gradient reduction, a train step, a DCP
checkpoint round trip, the nccl transport's streaming send (two reused GPU buckets, a
recording communicator in place of vLLM's), cuda_ipc's fill read back by another process,
and a one-rank NCCL broadcast group. Part 2, where vLLM and Ray are installed: the GPU
tests (tests/gpu/test_gpu.py: a CUDA engine reloaded over every one-GPU transport, sleep and
wake, a 2-step colocated driver run).

    python tests/gpu/check_device.py [--part 1|2|all]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # check_device.sh puts it on PYTHONPATH
RESULTS: list[tuple[str, str, str]] = []


def report(step: str, status: str, reason: str) -> None:
    RESULTS.append((step, status, reason))
    print(f"{status:<4} {step}: {reason}", flush=True)


def run_step(step: str, fn, *args):
    start = time.monotonic()
    try:
        reason = fn(*args)
    except Exception as e:  # noqa: BLE001 - a failed step is reported, the next still runs
        traceback.print_exc()
        report(step, "FAIL", f"{type(e).__name__}: {e}")
        return None
    report(step, "PASS", f"{reason} ({time.monotonic() - start:.1f} s)")
    return reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- part 1

class State:
    model_dir = ""
    learner = None
    tmp = ""
    cpu = False  # --cpu-dry-run: the script's own logic on gloo + CPU (no CUDA steps)


def step_fsdp2_train(state: State) -> str:
    import torch
    from torch.distributed.fsdp import FSDPModule

    from srpo_ray.config.load import load_config
    from srpo_ray.learner.batch import TrainBatch
    from srpo_ray.learner.core import FSDPLearner
    from srpo_ray.models import build_tiny_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    state.model_dir = build_tiny_model(os.path.join(state.tmp, "model"), tie_word_embeddings=True,
                                       hidden=128, heads=2, layers=2)
    gpus = "0" if state.cpu else "1"
    cfg = load_config(None, ["learner.num_ranks=1", f"learner.gpus_per_rank={gpus}", f"rollout.gpus_per_worker={gpus}",
                             "model.dtype=" + ("bfloat16" if state.cpu else "auto"), "optim.lr=1e-3"])
    learner = FSDPLearner(state.model_dir, cfg, 0, 1)
    learner.setup()
    state.learner = learner
    device = "cpu" if state.cpu else "cuda"
    assert learner.device.type == device and learner.compute_dtype == torch.bfloat16, learner.compute_dtype
    assert isinstance(learner.model, FSDPModule), "one bf16 rank must still be FSDP2 (it casts)"
    assert all(p.dtype == torch.float32 for p in learner.model.parameters()), "master weights must stay fp32"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (8, 24), generator=gen)
    mask = torch.zeros(8, 24)
    mask[:, 8:] = 1
    batch = TrainBatch(ids, torch.ones_like(ids), mask, torch.randn(8, generator=gen), torch.full((8, 24), -1.0) * mask)
    before = learner.logprobs_of(ids)
    logits_dtype = learner.model(input_ids=ids[:1].to(device)).logits.dtype
    metrics = learner.train_step(batch, float(mask.sum()), 1.0)
    after = learner.logprobs_of(ids)
    grads = [p.grad for p in learner.model.parameters() if p.grad is not None]
    assert metrics["learner/optimizer_steps"] == 1 and torch.isfinite(torch.tensor(metrics["learner/loss"]))
    assert (after - before).abs().max() > 1e-3, "the step did not change the policy"
    assert logits_dtype == torch.bfloat16 and not grads  # zero_grad(set_to_none) after the step
    return f"bf16 compute, fp32 master weights, loss {metrics['learner/loss']:.4f}, grad norm " \
           f"{metrics['learner/grad_norm']:.3f}"


def step_dcp(state: State) -> str:
    import torch

    from srpo_ray.learner.core import FSDPLearner

    learner = state.learner
    ckpt = os.path.join(state.tmp, "ckpt")
    learner.save_checkpoint(ckpt)
    ids = torch.randint(0, 500, (2, 16))
    want = learner.logprobs_of(ids)
    other = FSDPLearner(state.model_dir, learner.cfg, 0, 1)
    other.setup()  # the process group exists already: reused
    other.load_checkpoint(ckpt)
    got = other.logprobs_of(ids)
    assert torch.equal(got, want), (got - want).abs().max()
    assert other.optimizer_steps == learner.optimizer_steps == 1
    assert Path(ckpt, "hf", "config.json").exists()
    del other
    return "hf/ + learner/ written; reloaded log-probs identical, optimizer step restored"


class RecordingComm:
    """In place of vLLM's PyNcclCommunicator: records every broadcast bucket."""

    def __init__(self):
        self.sent: list[int] = []

    def broadcast(self, tensor, src, stream=None):
        assert src == 0 and tensor.is_cuda
        self.sent.append(tensor.numel())

    def destroy(self):
        pass


class LocalOps:
    def node_ip(self):
        return "127.0.0.1"

    def current_actor(self):
        return None


def step_streaming(state: State) -> str:
    import torch

    from srpo_ray.weights.layout import streaming_peak_bytes, unpack_bucket
    from srpo_ray.weights.nccl import NcclTransport
    from srpo_ray.weights.transport import SenderSettings

    learner = state.learner
    ops = LocalOps()
    transport = NcclTransport(ops, SenderSettings(ops, bucket_bytes=64 << 10, timeout_s=60))
    comm = transport._comm = RecordingComm()
    source = learner.weight_source(torch.bfloat16, send_tied=False)
    published = transport.publish(source)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    transport.serve_send(published.publish_id, "")
    extra = torch.cuda.max_memory_allocated() - base
    largest = max(s.nbytes for s in source.specs)  # bf16 bytes: gathered fp32 (2x) + its cast (1x)
    bound = streaming_peak_bytes(published.buckets) + 3 * largest + (1 << 20)
    assert extra <= bound, f"streaming held {extra} bytes extra, bound {bound}"
    assert comm.sent == [b.nbytes for b in published.buckets]
    want = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to(torch.bfloat16).cpu()
            for n, t in learner.model.state_dict().items()}
    for flat, meta in zip(transport._host.flats, published.buckets):
        for name, got in unpack_bucket(flat, meta):
            assert torch.equal(got, want[name]), name
    transport.close()
    model_bytes = sum(b.nbytes for b in published.buckets)
    return (f"{len(published.buckets)} buckets ({model_bytes} bytes) sent from two reused buffers; peak extra "
            f"{extra} bytes <= {bound}; host copy identical")


def _ipc_reader(handle, nbytes, queue):
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(next(iter(handle.values())))
    args[6] = 0  # this process's device index (vLLM's packed_ipc_consumer does the same)
    buf = rebuild_cuda_tensor(*args)
    queue.put(int(buf[:nbytes].to(torch.int64).sum().item()))


def step_cuda_ipc(state: State) -> str:
    import torch
    import torch.multiprocessing as mp

    from srpo_ray.weights.cuda_ipc import CudaIpcTransport
    from srpo_ray.weights.transport import SenderSettings

    ops = LocalOps()
    transport = CudaIpcTransport(ops, SenderSettings(ops, bucket_bytes=64 << 10, timeout_s=60))
    published = transport.publish(state.learner.weight_source(torch.bfloat16, send_tied=False))
    handle = transport.serve_fill(published.publish_id, 0)
    meta = published.buckets[0]
    want = int(transport._buffer[:meta.nbytes].to(torch.int64).sum().item())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    reader = ctx.Process(target=_ipc_reader, args=(handle, meta.nbytes, queue))
    reader.start()
    got = queue.get(timeout=120)
    reader.join(60)
    for index in range(1, len(published.buckets)):  # drain the stream: every rank's gathers done
        transport.serve_fill(published.publish_id, index)
    transport.serve_done()
    assert got == want, (got, want)
    return f"another process read chunk 0 ({meta.nbytes} bytes) through the IPC handle"


def step_broadcast(state: State) -> str:
    import torch

    from srpo_ray.weights.broadcast import BroadcastGroup
    from srpo_ray.weights.common import open_store

    store = open_store("127.0.0.1", free_port(), is_master=True, timeout_s=60)
    backend = "gloo" if state.cpu else "nccl"
    group = BroadcastGroup(store, "check", 0, 1, backend, 60)
    t = torch.arange(1000, device=group.device, dtype=torch.float32)
    group.broadcast(t)
    assert torch.equal(t.cpu(), torch.arange(1000, dtype=torch.float32))
    group.close()
    return f"a {backend} group on a TCPStore (no init_process_group) broadcast a {group.device.type} tensor"


def part1(cpu_dry_run: bool = False) -> None:
    steps = ("fsdp2_bf16_train_step", "dcp_save_load", "streaming_buckets", "cuda_ipc_fill", "nccl_broadcast")
    missing = [m for m in ("torch", "omegaconf", "pyarrow", "safetensors", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
        for step in steps:
            report(step, "FAIL", f"{', '.join(missing)} not importable by {sys.executable} (set PYTHON=...)")
        return
    import torch

    if not torch.cuda.is_available() and not cpu_dry_run:
        for step in steps:
            report(step, "SKIP", "no CUDA device (torch.cuda.is_available() is False)")
        return
    if torch.cuda.is_available():
        report("environment", "INFO", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                      f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s)")
    state = State()
    state.cpu = cpu_dry_run
    with tempfile.TemporaryDirectory() as tmp:
        state.tmp = tmp
        if run_step("fsdp2_bf16_train_step", step_fsdp2_train, state) is None:
            for step in steps[1:4]:
                report(step, "SKIP", "needs the learner of fsdp2_bf16_train_step")
        else:
            run_step("dcp_save_load", step_dcp, state)
            for step, fn in (("streaming_buckets", step_streaming), ("cuda_ipc_fill", step_cuda_ipc)):
                if state.cpu:
                    report(step, "SKIP", "CUDA streams and IPC (--cpu-dry-run)")
                else:
                    run_step(step, fn, state)
        run_step("nccl_broadcast", step_broadcast, state)
        if state.learner is not None:
            state.learner.close()


# ----------------------------------------------------------------------------- part 2

def part2(timeout_s: int) -> None:
    missing = [m for m in ("vllm", "ray", "torch") if importlib.util.find_spec(m) is None]
    tests = {"cuda_engine_reload": "every_one_gpu_transport or sleeping_engine",
             "driver_two_steps_colocated": "driver_trains_two_steps"}
    for step, selection in tests.items():
        if missing:
            report(step, "SKIP", f"{' and '.join(missing)} not installed (pip install '.[gpu]')")
            continue
        import torch

        if not torch.cuda.is_available():
            report(step, "SKIP", "no CUDA device")
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests/gpu/test_gpu.py", "-k", selection]
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            report(step, "FAIL", f"over {timeout_s} s: {' '.join(cmd)}")
            continue
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        status = "PASS" if done.returncode == 0 and "passed" in tail[0] else "FAIL"
        if status == "FAIL":
            print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
        report(step, status, f"{tail[0]} ({time.monotonic() - start:.0f} s)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("1", "2", "all"))
    ap.add_argument("--test-timeout", type=int, default=150, help="seconds per pytest run of part 2")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run part 1's learner steps on CPU (gloo, bf16) to check this script itself")
    args = ap.parse_args()
    if args.part in ("1", "all"):
        part1(args.cpu_dry_run)
    if args.part in ("2", "all"):
        part2(args.test_timeout)
    failed = [step for step, status, _ in RESULTS if status == "FAIL"]
    print(f"\n{len([r for r in RESULTS if r[1] == 'PASS'])} passed, {len(failed)} failed, "
          f"{len([r for r in RESULTS if r[1] == 'SKIP'])} skipped" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
