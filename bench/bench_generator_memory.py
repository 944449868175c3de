"""A generation worker's speed, page faults and memory over many generate calls, per
rollout.host_heap policy.

    .venv/bin/python bench/bench_generator_memory.py [--policies reuse trim] [--calls 24]
        [--prompts 8 --n 8] [--out bench/results/generator_memory/DATE.txt]

Each policy runs in a child process of its own (the policy is process-wide: glibc's
mallopt): it starts actors.generation.GenerationWorkerImpl in-process as a Ray worker
would (the default config, the bundled SmolLM2, one vLLM engine) and calls generate
--calls times on the default's arithmetic prompts, cycling max_new_tokens through
64, 128, 32, 96 so the logits' blocks change size. Per call: seconds, minor page faults,
VmRSS and VmHWM (peak) of the process. The question it answers: does a heap that is never
trimmed (reuse, the CPU default) hold more memory over a long run than glibc's default
(trim)? Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = (64, 128, 32, 96)
GiB = 1 << 30


def run_policy(policy: str, calls: int, num_prompts: int, n: int) -> None:
    """The child: one worker, `calls` generate calls; a line per call on stdout."""
    from bench_learner_memory import _proc_status  # imports torch and Ray: the child only

    from actors.generation import GenerationWorkerImpl
    from srpo_ray.config.load import load_config
    from srpo_ray.data.parquet import load_prompts
    from srpo_ray.models import resolve_model_path
    from srpo_ray.records import Sampling

    cfg = load_config(None, [f"rollout.host_heap={policy}"])
    prompts = [p for p in load_prompts(cfg.data.train_files) if p.domain == "math"]
    worker = GenerationWorkerImpl(resolve_model_path(cfg.model), cfg.rollout, "float32",
                                  cfg.data.max_prompt_tokens, 0)
    for i in range(calls):
        start = (i * num_prompts) % max(1, len(prompts) - num_prompts)
        sampling = Sampling(n=n, temperature=0.8, top_p=1.0,
                            max_new_tokens=MAX_NEW_TOKENS[i % len(MAX_NEW_TOKENS)], seed=i)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        began = time.perf_counter()
        worker.generate(prompts[start:start + num_prompts], sampling)
        seconds = time.perf_counter() - began
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        memory = _proc_status(os.getpid())
        print(f"ROW {i} {sampling.max_new_tokens} {seconds:.2f} {faults} "
              f"{memory['VmRSS']} {memory['VmHWM']}", flush=True)


def measure(policy: str, args: argparse.Namespace) -> list[dict]:
    child = subprocess.run([sys.executable, __file__, "--child", policy, "--calls", str(args.calls),
                            "--prompts", str(args.prompts), "--n", str(args.n)],
                           capture_output=True, text=True, cwd=REPO)
    rows = [line.split()[1:] for line in child.stdout.splitlines() if line.startswith("ROW ")]
    if child.returncode != 0 or len(rows) != args.calls:
        raise SystemExit(f"{policy}: the child failed (rc {child.returncode}):\n{child.stderr[-3000:]}")
    return [{"call": int(c), "max_new_tokens": int(m), "seconds": float(s), "faults": int(f),
             "rss": int(r), "peak": int(p)} for c, m, s, f, r, p in rows]


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [f"# generation worker memory, {datetime.date.today()}: {args.calls} calls of "
             f"{args.prompts} prompts x {args.n} samples, max_new_tokens cycling {MAX_NEW_TOKENS}", "",
             "| call | max_new | " + " | ".join(f"{p}: s, faults, RSS GiB" for p in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for i in range(args.calls):
        cells = [f"{r[i]['seconds']:.1f}, {r[i]['faults']}, {r[i]['rss'] / GiB:.2f}" for r in results.values()]
        lines.append(f"| {i} | {MAX_NEW_TOKENS[i % len(MAX_NEW_TOKENS)]} | " + " | ".join(cells) + " |")
    lines += ["", "| policy | median s per call | faults per call after call 3 (median) | "
              "RSS after call 1 | RSS at the end | peak |", "|---|---|---|---|---|---|"]
    for policy, rows in results.items():
        lines.append(f"| {policy} | {statistics.median(r['seconds'] for r in rows):.1f} | "
                     f"{statistics.median(r['faults'] for r in rows[3:] or rows):.0f} | "
                     f"{rows[0]['rss'] / GiB:.2f} GiB | {rows[-1]['rss'] / GiB:.2f} GiB | "
                     f"{max(r['peak'] for r in rows) / GiB:.2f} GiB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["reuse", "trim"])
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench/results/generator_memory" / f"{datetime.date.today()}.txt"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_policy(args.child, args.calls, args.prompts, args.n)
        return 0
    results = {policy: measure(policy, args) for policy in args.policies}
    text = report(results, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
