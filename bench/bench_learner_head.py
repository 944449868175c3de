"""Peak host memory of the learner's log-prob head: full logits (today's path for small
micro-batches) vs the chunked head (srpo_ray/learner/logprob_head.py).

    .venv/bin/python bench/bench_learner_head.py [--vocab 151936 --hidden 64]
        [--old-tokens 1024 2048 4096] [--chunked-tokens 1024 4096 16384]
        [--out bench/results/learner_head.txt]

One micro-batch: a sequence of 1 prompt token + N response tokens, its final hidden
states [1, N+1, H] (random, standing in for the backbone's output) and a head [V, H],
both float32 with gradients. Each variant computes the log-probs, the entropy as a
metric (algo.entropy_coef = 0, the default) and a policy-gradient-like loss, then its
backward, the learner's work per micro-batch after the backbone:
  old      F.linear -> [1, N+1, V] logits -> core.token_logprobs ([N, V] float32 rows);
  chunked  logprob_head.chunked_token_logprobs, learner.logprob_chunk_tokens' default.
Each (variant, N) runs in a fresh child process; its figure is the rise of the peak RSS
(ru_maxrss, the kernel's high-water mark) over its value once the inputs exist, so
torch's import and the inputs are not counted. The hidden size is a stand-in (the
[N, V] terms dominate; a real model adds its hidden [N, H] and a [V, H] float32 head
gradient); the old path at 16,384 tokens needs more than this machine's memory, so it
is measured at fewer tokens and extrapolated linearly (its size is linear in N).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def child(variant: str, tokens: int, vocab: int, hidden: int, chunk: int) -> None:
    """Run one variant once and print {"peak_bytes", "seconds"} as JSON."""
    import torch
    import torch.nn.functional as F

    from srpo_ray.learner.core import token_logprobs
    from srpo_ray.learner.logprob_head import chunked_token_logprobs

    torch.manual_seed(0)
    positions = tokens + 1
    h = torch.randn(1, positions, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden ** -0.5).requires_grad_()
    ids = torch.randint(0, vocab, (1, positions))
    mask = torch.ones(1, positions)
    mask[:, 0] = 0
    adv = torch.randn(1, positions)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    if variant == "old":
        lp, ent = token_logprobs(F.linear(h, w), ids, mask, 0.7, with_entropy=True)
    else:
        lp, ent = chunked_token_logprobs(h, w, None, ids, mask, 0.7, with_entropy=True, chunk_tokens=chunk)
    (lp * adv).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(ent).all()
    print(json.dumps({"peak_bytes": peak - base, "seconds": seconds}))


def measure(variant: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from srpo_ray.config.schema import LearnerConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=LearnerConfig().logprob_chunk_tokens)
    p.add_argument("--old-tokens", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--chunked-tokens", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--target-tokens", type=int, default=16384)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "learner_head.txt"))
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.vocab, args.hidden, args.chunk)

    rows = [("old", n, measure("old", n, args)) for n in args.old_tokens]
    rows += [("chunked", n, measure("chunked", n, args)) for n in args.chunked_tokens]
    old_per_token = max((r["peak_bytes"] / n for v, n, r in rows if v == "old"), default=0.0)
    old_target = old_per_token * args.target_tokens
    chunked_target = next((r["peak_bytes"] for v, n, r in rows if v == "chunked" and n == args.target_tokens), None)
    lines = [
        f"# learner log-prob head, peak host memory, {datetime.date.today()} ({platform.machine()}, "
        f"{platform.processor() or 'cpu'}, torch threads default)",
        f"# one micro-batch: 1 prompt + N response tokens, vocab {args.vocab}, hidden {args.hidden} "
        "(a stand-in: the [N, V] terms dominate), float32, CPU;",
        "# log-probs + entropy (metric) + backward; peak = rise of ru_maxrss in a fresh process",
        f"# chunked: learner.logprob_chunk_tokens = {args.chunk}",
        "",
        "| variant | response tokens | peak GB | seconds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {v} | {n} | {r['peak_bytes'] / GB:.2f} | {r['seconds']:.1f} |" for v, n, r in rows]
    lines += ["", f"old at {args.target_tokens} tokens (linear from its largest per-token figure, "
                  f"{old_per_token / 1e6:.2f} MB/token): {old_target / GB:.1f} GB, not run (machine: "
                  f"{_mem_total_gb():.0f} GB)"]
    if chunked_target:
        lines.append(f"chunked at {args.target_tokens} tokens: {chunked_target / GB:.2f} GB "
                     f"(ratio old / chunked: {old_target / chunked_target:.1f}x)")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def _mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024 / GB


if __name__ == "__main__":
    main()
