"""Host memory of the FSDP2 learner ranks, phase by phase.

    .venv/bin/python bench/bench_learner_memory.py [--model-dir DIR] [--ranks 2]
        [--seqs 64 --prompt-len 64 --response-len 96] [--kl-coef 0.0] [--steps 2]
        [--set learner.host_heap=reuse ...]

Starts `--ranks` LearnerRank actors on a local Ray exactly as the runtime does
(srpo_ray.runtime.learner_group.create_learner_group, config configs/default.yaml plus the flags), then
reads each rank's memory from /proc/<pid>/status after every phase: setup, each train
step (a synthetic TrainBatch of --seqs sequences, the default run's shape: 8 prompts x
8 samples, up to 64 prompt + 96 response tokens), and a weight publish (full_state_dict
gathered on every rank, bucketed by rank 0 into the object store, as the trainer does).

Columns per rank and phase:
  peak    VmHWM, the high-water RSS during the phase (reset before each phase through
          /proc/<pid>/clear_refs, so a phase's peak is its own);
  rss     VmRSS after the phase, of which
  anon    RssAnon (heap: tensors, malloc arenas) and
  file    RssFile (mapped files: shared libraries, mmapped safetensors);
  shm     RssShmem (shared memory: Ray's object store pages this process mapped);
  tensors bytes of the rank's model shards, gradients, optimizer state and reference
          model (what must be resident), from inside the actor;
  free    glibc heap bytes free (mallinfo2 fordblks), the allocator's cache; it still
          counts pages malloc_trim has already handed back (they left anon).
  page faults, kernel
          minor page faults and kernel CPU seconds of the rank during the phase
          (/proc/<pid>/stat): fresh pages for the tensors of a step, learner.host_heap.

Model: --model-dir, default the cached SmolLM2-135M (~/.cache/srpo_ray/models/
smollm2-135m-instruct) when present, else a tiny model built in a temp folder.
Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import ray  # noqa: E402
import torch  # noqa: E402

from srpo_ray.config.load import load_config  # noqa: E402
from srpo_ray.learner.batch import TrainBatch  # noqa: E402
from srpo_ray.models import build_tiny_model  # noqa: E402
from srpo_ray.runtime.learner_group import create_learner_group  # noqa: E402

SMOLLM2_CACHE = Path("~/.cache/srpo_ray/models/smollm2-135m-instruct").expanduser()
MiB = 1 << 20


def synthetic_batch(seqs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> TrainBatch:
    """`seqs` rows of random tokens; response lengths vary between half and all of
    `response_len` (as real rollouts do), right-padded; advantages alternate +-1."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + response_len
    ids = torch.randint(3, vocab, (seqs, width), generator=g)
    attn = torch.zeros(seqs, width, dtype=torch.long)
    resp = torch.zeros(seqs, width)
    for b in range(seqs):
        n = response_len // 2 + int(torch.randint(0, response_len // 2 + 1, (1,), generator=g))
        attn[b, :prompt_len + n] = 1
        resp[b, prompt_len:prompt_len + n] = 1
    ids = ids * attn
    adv = torch.tensor([1.0 if b % 2 else -1.0 for b in range(seqs)])
    return TrainBatch(input_ids=ids, attention_mask=attn, response_mask=resp, advantages=adv,
                      rollout_logprobs=-2.0 * resp)


# ----------------------------------------------------------------------------- probes

def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _faults_and_kernel_s(pid: int) -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of the process so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


_last_counters: dict[int, tuple[int, float]] = {}


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _inside(rank_impl) -> dict:
    """Runs in the actor (through __ray_call__): resident tensor bytes and heap cache."""
    gc.collect()
    learner = rank_impl.learner

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.untyped_storage().nbytes()
        return total

    params = list(learner.model.parameters()) if learner.model is not None else []
    opt = [v for s in learner.optimizer.state.values() for v in s.values()
           if torch.is_tensor(v)] if learner.optimizer is not None else []
    ref = list(learner.ref_model.parameters()) if learner.ref_model is not None else []
    out = {"params": nbytes(params), "grads": nbytes(p.grad for p in params), "optim": nbytes(opt),
           "ref": nbytes(ref), "free": 0}

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        out["free"] = int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        pass
    return out


def _pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def report(phase: str, handles, pids) -> None:
    inside = ray.get([h.__ray_call__.remote(_inside) for h in handles])
    for rank, (pid, info) in enumerate(zip(pids, inside)):
        st = _proc_status(pid)
        held = info["params"] + info["grads"] + info["optim"] + info["ref"]
        faults, kernel_s = _faults_and_kernel_s(pid)
        last_faults, last_kernel_s = _last_counters.get(pid, (0, 0.0))
        _last_counters[pid] = faults, kernel_s
        print(f"{phase:<14} rank {rank}: peak {st['VmHWM'] / MiB:7.0f}  rss {st['VmRSS'] / MiB:7.0f}  "
              f"anon {st['RssAnon'] / MiB:7.0f}  file {st['RssFile'] / MiB:5.0f}  shm {st['RssShmem'] / MiB:5.0f}  "
              f"tensors {held / MiB:6.0f} (params {info['params'] / MiB:.0f}, grads {info['grads'] / MiB:.0f}, "
              f"optim {info['optim'] / MiB:.0f}, ref {info['ref'] / MiB:.0f})  free {info['free'] / MiB:6.0f}  MiB; "
              f"page faults {faults - last_faults}, kernel {kernel_s - last_kernel_s:.1f} s",
              flush=True)
        _reset_peak(pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides, a.b=c")
    args = ap.parse_args()

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        if (SMOLLM2_CACHE / "config.json").is_file():
            model_dir = str(SMOLLM2_CACHE)
        else:
            tmp = tempfile.TemporaryDirectory()
            model_dir = build_tiny_model(tmp.name, tie_word_embeddings=True)
    cfg = load_config(None, [f"algo.kl_coef={args.kl_coef}", "learner.collective_timeout_s=900", *args.set])
    vocab = int(__import__("json").loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    print(f"model {model_dir}; {args.ranks} ranks; batch {args.seqs} x <= {args.prompt_len}+{args.response_len} "
          f"tokens, micro_batch_size {cfg.learner.micro_batch_size}, kl_coef {args.kl_coef}, "
          f"glibc env {({k: v for k, v in os.environ.items() if k.startswith('MALLOC_')}) or 'default'}", flush=True)

    # glibc tunables given to this script (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_, ...)
    # reach the ranks too, to compare allocator settings
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
                                       **malloc_env}})
    try:
        group = create_learner_group(cfg, model_dir, num_ranks=args.ranks,
                                     actor_options=lambda r: {"num_cpus": 0.5}, setup=False)
        group.get = functools.partial(ray.get, timeout=1800)
        handles = group.handles
        pids = [_pid(h) for h in handles]
        for pid in pids:
            _reset_peak(pid)
        report("created", handles, pids)
        group.setup()
        report("setup", handles, pids)
        batch = synthetic_batch(args.seqs, args.prompt_len, args.response_len, vocab)
        for step in range(args.steps):
            start = time.perf_counter()
            group.train(batch, temperature=cfg.rollout.temperature)
            print(f"train step {step + 1}: {time.perf_counter() - start:.1f} s", flush=True)
            report(f"train {step + 1}", handles, pids)
            ray.get([h.publish_weights.remote() for h in handles], timeout=1800)
            report(f"publish {step + 1}", handles, pids)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
