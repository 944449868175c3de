"""Asynchronous training on this machine, for real: synchronous vs one-step-off vs
rollout.steps_ahead = 2 and 4 with partial rollouts, generation and learner on separate cores.

    .venv/bin/python bench/bench_async_cpu.py [--steps 7] [--warmup 2] [--out bench/results/async_cpu]
    .venv/bin/python bench/bench_async_cpu.py --reuse     # only the modes not in --work-dir yet

Each mode is one run of `python -m srpo_ray.driver` (real vLLM worker, real learner, real
reward workers and sandbox) with rollout.cpus_per_worker=1 and learner.cpus_per_rank=1, so
generation and training each own one of the two cores and can overlap. The workload is
long-tailed: one stage of math + code from `builtin:math_code`, the sources weighted so
half the prompts are programs (8 programs, 128 sums), up to --max-new-tokens tokens; sums
take ~25 tokens, programs from ~20 to the cap (the measured distribution is printed).

Per mode, over the steps after --warmup (the pipeline filling): mean step time and its
ratio to synchronous, the generator's idle share (time/generator_idle over step time), the
learner's idle share (time/learner_wait: waiting for rollouts), staleness, groups
discarded, and a two-sample KS test of the trained response lengths against synchronous
training's (nothing discarded: the length mix should survive). Also one synchronous run
with both roles on both cores (the default layout), the baseline async has to beat to be
worth its staleness. Nothing here is a stand-in; the
figures are this 2-core VM's, and timings vary with its load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from experiment_srpo import launch  # noqa: E402  (one driver run in a fresh process, checkpoints deleted)

SPLIT = ["rollout.cpus_per_worker=1", "learner.cpus_per_rank=1"]
MODES = {
    "sync, 2+2 cores shared (default layout)": ["rollout.steps_ahead=0"],
    "sync, 1+1 cores": [*SPLIT, "rollout.steps_ahead=0"],
    "one-step-off (k=1), 1+1 cores": [*SPLIT, "rollout.steps_ahead=1", "rollout.max_staleness=1",
                                      "algo.tis_cap=2.0"],
    "k=2 + partial rollouts, 1+1 cores": [*SPLIT, "rollout.steps_ahead=2", "rollout.max_staleness=2",
                                          "rollout.partial_rollouts=true", "algo.tis_cap=2.0"],
    "k=4 + partial rollouts, 1+1 cores": [*SPLIT, "rollout.steps_ahead=4", "rollout.max_staleness=4",
                                          "rollout.partial_rollouts=true", "algo.tis_cap=2.0"],
}
BASELINE = "sync, 1+1 cores"


def ks_two_sample(a: list[int], b: list[int]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (D, asymptotic p) with Stephens' small-sample
    correction (Numerical Recipes' probks). Ties (integer lengths) make it conservative."""
    xs = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate(xs)
    d = float(np.max(np.abs(np.searchsorted(xs[0], grid, side="right") / len(xs[0])
                            - np.searchsorted(xs[1], grid, side="right") / len(xs[1]))))
    root = np.sqrt(len(xs[0]) * len(xs[1]) / (len(xs[0]) + len(xs[1])))
    lam = (root + 0.12 + 0.11 / root) * d
    if lam < 1e-3:
        return d, 1.0
    j = np.arange(1, 101)
    return d, float(np.clip(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j ** 2 * lam ** 2)), 0.0, 1.0))


def common(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [f"trainer.run_dir={run_dir}", f"trainer.total_steps={args.steps}", "trainer.save_every=0",
            f"trainer.prompts_per_step={args.prompts}", f"rollout.n={args.n}", "eval.files=[]",
            f"stages=[{{name: mixed, domains: [math, code], max_new_tokens: {args.max_new_tokens}, source_weights: "
            "{builtin/arithmetic: 2, builtin/stdin-code: 1, builtin/function-code: 1}}]",
            "metrics.progress_bar=false", "metrics.trackers=[jsonl]", "metrics.rollouts_per_step=1000"]


def summarise(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r and r["step"] > warmup]
    total = sum(r["time/step"] for r in rows)
    lengths: dict[str, list[int]] = {}
    for line in (run_dir / "rollouts.jsonl").read_text().splitlines():
        group = json.loads(line)
        lengths.setdefault(group["domain"], []).extend(len(s["token_ids"]) for s in group["samples"])
    return {"steps": len(rows), "step_s": total / len(rows),
            "generator_idle": sum(r.get("time/generator_idle", 0.0) for r in rows) / total,
            "learner_idle": sum(r.get("time/learner_wait", 0.0) for r in rows) / total,
            "staleness_max": max(r.get("rollout/staleness_max", 0) for r in rows),
            "token_staleness": float(np.mean([r.get("rollout/token_staleness_mean", r.get("rollout/staleness_mean", 0))
                                              for r in rows])),
            "discarded": sum(r.get("rollout/stale_discarded", 0) for r in rows),
            "lengths": {d: [int(x) for x in np.percentile(v, [10, 50, 90, 100])] + [len(v)]
                        for d, v in sorted(lengths.items())},
            "raw_lengths": {d: v for d, v in sorted(lengths.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", default=None, help="comma-separated indices into the modes (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="summarise a mode's earlier run in --work-dir instead of running it again")
    ap.add_argument("--work-dir", default="/tmp/bench_async_cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "async_cpu"))
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    chosen = list(MODES) if args.modes is None else [list(MODES)[int(i)] for i in args.modes.split(",")]
    results = {}
    for name in chosen:
        run_dir = Path(args.work_dir) / f"mode{list(MODES).index(name)}"
        if args.reuse and (run_dir / "rollouts.jsonl").exists():
            wall = None
        else:
            wall = launch(name, [*common(args, run_dir), *MODES[name]], run_dir)
        results[name] = {**summarise(run_dir, args.warmup), "wall_s": wall}
        print(f"  {json.dumps({k: v for k, v in results[name].items() if k != 'raw_lengths'})}", flush=True)
    report = format_report(results, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M")
    (out / f"{stamp}.txt").write_text(report)
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=1))
    print(report)
    return 0


def format_report(results: dict, args: argparse.Namespace) -> str:
    baseline = results[BASELINE]["step_s"] if BASELINE in results else None
    lines = [f"bench_async_cpu {datetime.datetime.now():%Y-%m-%dT%H:%M}: {args.prompts} prompts x {args.n} samples "
             f"a step, math + code (half programs), <= {args.max_new_tokens} new tokens, {args.steps} steps, "
             f"figures over steps {args.warmup + 1}-{args.steps}; SmolLM2-135M, 2-core VM",
             "", "| mode | step (s) | vs sync 1+1 | generator idle | learner idle | max staleness | "
             "token staleness | discarded |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['step_s'] / baseline:.2f}x" if baseline else "-"
        lines.append(f"| {name} | {r['step_s']:.1f} | {ratio} | {r['generator_idle']:.0%} | {r['learner_idle']:.0%} "
                     f"| {r['staleness_max']} | {r['token_staleness']:.2f} | {r['discarded']:.0f} |")
    lines += ["", "response lengths (tokens) of the trained samples, p10 / p50 / p90 / max (samples); a two-sample "
              f"KS test against {BASELINE!r} (same prompts and seeds: does what trains keep the length mix?):"]
    for name, r in results.items():
        ks = {}
        if BASELINE in results and name != BASELINE:
            ks = {d: ks_two_sample(v, results[BASELINE]["raw_lengths"][d]) for d, v in r["raw_lengths"].items()
                  if d in results[BASELINE]["raw_lengths"]}
        lines.append(f"- {name}: " + "; ".join(
            f"{d} {a} / {b} / {c} / {m} ({n})" + (f", KS D={ks[d][0]:.3f} p={ks[d][1]:.2f}" if d in ks else "")
            for d, (a, b, c, m, n) in r["lengths"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
