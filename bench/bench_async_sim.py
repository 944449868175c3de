"""Asynchronous training at the paper's shape, simulated: synchronous vs rollout.steps_ahead
= 1, 2, 4, with the real scheduling code and simulated durations.

    .venv/bin/python bench/bench_async_sim.py [--steps 16] [--engines 8] [--train-ratio 0.7]
        [--out bench/results/async_sim.txt]

What is real: srpo_ray/loop/pipeline.RolloutPipeline, the trainer's scheduler (one
collector thread; AReaL's admission rule; a buffer of collected steps; weight pushes only
while no collection runs; nothing admitted is discarded), driven by a loop shaped like
SRPOTrainer.fit (take -> training() -> trained -> done).

What is simulated (stand-ins for the GPUs), in simulated seconds that run as real sleeps
scaled by --time-scale (one simulated second = 2 ms by default):
- a step's generation: 256 prompts x 32 samples, response lengths log-normal (median
  --median-len 1500 tokens, sigma --sigma 1.0) clipped to [64, 8192] (the long tail SRPO
  reports), drawn once per step so every mode sees the same workload; groups dealt
  round-robin to --engines engines, each with continuous batching of up to --max-batch
  sequences, where one decode step takes t0 + t1 x (sequences in the batch) (memory-bound
  decode: 25 ms + 0.1 ms per sequence, i.e. 50 ms at 256). A collection ends when its
  slowest engine finishes its last sequence, as ours does (no partial rollouts);
- the learner's update: --train-ratio x the mean synchronous generation time, scaled by
  the step's token count over the mean;
- the weight push: --push-s (15 s: a 32B model over NCCL plus the engines' reload).

Printed per mode: mean step time and its ratio to synchronous, the generators' idle share
(no collection running), their slot occupancy (busy share x the mean fraction of batch
slots in use: the tail of each collection, where a few long responses hold an engine, is
the waste only partial rollouts remove), the learner's idle share, the largest staleness
trained on, and collected vs trained steps (equal: nothing is discarded).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from srpo_ray.loop.pipeline import RolloutPipeline  # noqa: E402


@dataclass
class Workload:
    """One step's simulated generation: its duration, slot occupancy and token count."""

    gen_s: float
    occupancy: float
    tokens: int


def engine_time(lengths: np.ndarray, max_batch: int, t0: float, t1: float) -> tuple[float, float]:
    """Continuous batching on one engine: (seconds until its last sequence ends, the
    time-averaged fraction of its max_batch slots in use)."""
    queue = list(lengths[::-1])
    active = np.array([queue.pop() for _ in range(min(max_batch, len(queue)))], dtype=np.int64)
    elapsed = slots = 0.0
    while active.size:
        advance = int(active.min())  # decode steps until the next sequence finishes
        step_s = t0 + t1 * active.size
        elapsed += advance * step_s
        slots += advance * step_s * active.size
        active = active - advance
        active = active[active > 0]
        refill = min(max_batch - active.size, len(queue))
        if refill:
            active = np.concatenate([active, [queue.pop() for _ in range(refill)]])
    return elapsed, slots / (elapsed * max_batch) if elapsed else 0.0


def simulate_step(rng: np.random.Generator, args: argparse.Namespace) -> Workload:
    samples = args.prompts * args.n
    lengths = np.clip(rng.lognormal(np.log(args.median_len), args.sigma, samples), 64, args.max_len).astype(np.int64)
    groups = lengths.reshape(args.prompts, args.n)
    per_engine = [groups[e::args.engines].ravel() for e in range(args.engines)]
    times = [engine_time(lens, args.max_batch, args.t0, args.t1) for lens in per_engine]
    gen_s = max(t for t, _ in times)
    # slots in use over the collection, engines that finished early counting as empty
    occupancy = sum(t * occ for t, occ in times) / (gen_s * len(times))
    return Workload(gen_s, occupancy, int(lengths.sum()))


def run_mode(k: int, steps: list[Workload], train_s: list[float], push_s: float, scale: float,
             partial: bool = False) -> dict:
    """The fit loop's schedule with steps_ahead = k; durations in simulated seconds.
    partial: rollout.partial_rollouts, through the pipeline's real interrupt path: a
    collection checks for an interrupt every simulated second of decoding, then waits in
    pause_for_push while the push runs, and goes on with the new version (its remaining
    time sampled by it: tokens are taken as proportional to decoding time)."""
    state = {"generator_version": 0, "busy": 0.0, "slot_busy": 0.0, "collected": 0, "stop_below": 0}
    lock = threading.Lock()
    pipe: RolloutPipeline

    def collect(step: int) -> dict | None:
        if step > len(steps):
            return None
        work = steps[step - 1]
        with lock:
            version = state["generator_version"]
        spans, left = [], work.gen_s  # (simulated seconds, version decoding them)
        began, done = time.perf_counter(), 0.0  # sleeps aim at deadlines: checks add no drift
        while left > 0:
            with lock:
                paused = partial and state["generator_version"] < state["stop_below"]
                current = state["generator_version"]
            if paused:
                pipe.pause_for_push()
                began, done = time.perf_counter(), 0.0
                continue
            chunk = min(left, 1.0) if partial else left
            done += chunk
            time.sleep(max(0.0, began + done * scale - time.perf_counter()))
            spans.append((chunk, current))
            left -= chunk
        with lock:
            state["busy"] += work.gen_s
            state["slot_busy"] += work.gen_s * work.occupancy
            state["collected"] += 1
        return {"step": step, "version": version, "spans": spans}

    learner = {"version": 0}

    def push() -> None:
        time.sleep(push_s * scale)
        with lock:
            state["generator_version"] = learner["version"]

    def interrupt(version: int) -> None:
        with lock:
            state["stop_below"] = max(state["stop_below"], version)

    pipe = RolloutPipeline(collect, push, k, may_start=lambda step, done: step <= len(steps), version=0, trained=0,
                           interrupt=interrupt if partial else None)
    staleness, token_staleness, trained = [], [], 0
    started = time.perf_counter()
    try:
        for step in range(1, len(steps) + 1):
            item = pipe.take(step)
            with pipe.training():
                staleness.append(learner["version"] - item["version"])
                total = sum(s for s, _ in item["spans"])
                token_staleness.append(sum(s * (learner["version"] - v) for s, v in item["spans"]) / total)
                time.sleep(train_s[step - 1] * scale)
            learner["version"] += 1
            trained += 1
            pipe.trained(step, learner["version"])
            pipe.done(step)
    finally:
        pipe.close()
    wall = (time.perf_counter() - started) / scale
    return {
        "k": k, "step_s": wall / len(steps), "generator_idle": 1 - state["busy"] / wall,
        "slot_occupancy": state["slot_busy"] / wall, "learner_idle": 1 - sum(train_s) / wall,
        "staleness_max": max(staleness), "token_staleness": float(np.mean(token_staleness)),
        "collected": state["collected"], "trained": trained,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--median-len", type=float, default=1500)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--t0", type=float, default=0.025, help="seconds per decode step, fixed part")
    ap.add_argument("--t1", type=float, default=0.0001, help="seconds per decode step per sequence")
    ap.add_argument("--train-ratio", type=float, default=0.7,
                    help="learner time of a step / mean synchronous generation time")
    ap.add_argument("--push-s", type=float, default=15.0)
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--partial-modes", type=int, nargs="*", default=[1, 2],
                    help="steps_ahead values also run with rollout.partial_rollouts")
    ap.add_argument("--time-scale", type=float, default=0.002, help="real seconds per simulated second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "async_sim.txt"))
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    steps = [simulate_step(rng, args) for _ in range(args.steps)]
    mean_gen = float(np.mean([w.gen_s for w in steps]))
    mean_tokens = float(np.mean([w.tokens for w in steps]))
    train_s = [args.train_ratio * mean_gen * w.tokens / mean_tokens for w in steps]
    lines = [
        f"bench_async_sim {datetime.datetime.now().isoformat(timespec='minutes')} on {platform.node()}: "
        f"{args.steps} steps of {args.prompts} x {args.n}, lengths lognormal(median {args.median_len:g}, "
        f"sigma {args.sigma:g}) in [64, {args.max_len}], {args.engines} engines x {args.max_batch} slots, "
        f"decode step {args.t0 * 1e3:g} ms + {args.t1 * 1e3:g} ms/seq, train {args.train_ratio:g}x generation, "
        f"push {args.push_s:g} s; one simulated second = {args.time_scale * 1e3:g} ms",
        "real: RolloutPipeline (admission, buffer, pushes between collections); simulated: generation, "
        "training and push durations (sleeps)",
        f"per step (simulated s): generation mean {mean_gen:.0f} (min {min(w.gen_s for w in steps):.0f}, "
        f"max {max(w.gen_s for w in steps):.0f}), slots in use {np.mean([w.occupancy for w in steps]):.0%}, "
        f"train mean {np.mean(train_s):.0f}, {mean_tokens / 1e6:.1f} M response tokens",
        "",
        "| steps_ahead | step (s) | vs sync | generator idle | slot occupancy | learner idle | max staleness | "
        "token staleness | collected / trained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sync_step = None
    for k, partial in [(k, False) for k in args.modes] + [(k, True) for k in args.partial_modes]:
        r = run_mode(k, steps, train_s, args.push_s, args.time_scale, partial)
        sync_step = sync_step or (r["step_s"] if k == 0 else None)
        ratio = f"{r['step_s'] / sync_step:.2f}x" if sync_step else "-"
        lines.append(f"| {k}{' partial' if partial else ''} | {r['step_s']:.0f} | {ratio} | {r['generator_idle']:.1%} | "
                     f"{r['slot_occupancy']:.1%} | {r['learner_idle']:.1%} | {r['staleness_max']} | "
                     f"{r['token_staleness']:.2f} | {r['collected']} / {r['trained']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
