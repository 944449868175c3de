"""srpo-ray's training step against a bare one-process GRPO loop, same task, same run.

    .venv/bin/python bench/bench_vs_bare.py [--steps 6] [--model PATH] [--learner-ranks N]
        [--with-one-step-off] [--only bare|srpo] [--set key=value ...] [--json OUT]

Both sides read one config: configs/default.yaml, cut to its math stage alone
(`stages=[{name: math, domains: [math]}]`) on the 1024-problem `builtin:arithmetic` set
(no epoch closes within a short run, so History Resampling never makes the two sides
draw different prompts), then --learner-ranks and every --set, so they share prompts
per step, n, temperature, max_new_tokens, reward, lr, AdamW, grad clip, micro-batch
and seeds. Each side runs in a child process of its own, one after the other:

    bare      one process, written out in bench/bare_loop.py: in-process vLLM, an HF model
              with AdamW, the project's reward scorer, advantages, batch and loss, the
              full state dict reloaded into vLLM after every update.
    srpo      the real loop (build_trainer + fit, as `python -m srpo_ray.driver` runs it)
              through bench_step_overhead.run_job, read back from metrics.jsonl.
    srpo 1-off  the same with rollout.one_step_off=true rollout.max_staleness=1
              (--with-one-step-off): step k+1 is generated and scored while step k trains.

Printed per phase (generate, score, train, train per trained sequence and per trained
response token, weight sync, whole step): median (min-max) seconds of each side and the
srpo / bare ratio. The weight sync is split where its time goes: the learner's publish
(bare: model.state_dict()), the generator's load (the transport's tensors fed to vLLM's
reload_weights, timed inside the worker; bare: reload_weights itself) and the rest (RPCs,
waiting for the worker). Step 1 is left out on both sides (first calls, lazy set-up). After
step 1 the two trajectories part (FSDP2 sums gradients in another order, so the weights,
then the samples, then the zero-variance groups differ): compare training per sequence
and per token, not per step. The header lists every difference between the two sides.
Prints figures only; asserts nothing about time. Check it at a tiny size, e.g.

    .venv/bin/python bench/bench_vs_bare.py --steps 2 --model /tmp/tiny --set \\
        rollout.max_new_tokens=8 trainer.prompts_per_step=4 rollout.n=4 learner.num_ranks=1 \\
        rollout.cpus_per_worker=1 rollout.kv_cache_memory_bytes=67108864 'reward.format_pattern=\\d'

(a tiny random model never answers right; a format bonus for any digit gives its groups
reward variance, so some steps train).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bare_loop import check_bare_supports, cores, run_bare  # noqa: E402
from bench_step_overhead import WORK, WORK_OVERLAPPED, report, run_job  # noqa: E402

from srpo_ray.config.load import SRPOConfig, load_config  # noqa: E402
from srpo_ray.generation.engine_setup import engine_env  # noqa: E402
from srpo_ray.runtime.fleets import chunk_count  # noqa: E402

SIDES = ("bare", "srpo", "srpo-1off")
# (label, metrics key): per-phase seconds as srpo-ray's metrics.jsonl names them
PHASES = (("generate", "time/generate"), ("score", "time/score"), ("train", "time/train"),
          ("train / sequence", "train_per_sequence"), ("train / resp. token", "train_per_token"),
          ("weight sync", "time/weight_sync"), ("  publish (learner)", "time/weight_publish"),
          ("  load (generator)", "time/weight_load"), ("  rest (RPC, waits)", "weight_sync_rest"),
          ("wait rollouts", "time/wait_rollouts"),
          ("step", "time/step"))


# ----------------------------------------------------------------------------- config

def bench_config(args: argparse.Namespace, run_dir: str = "runs/bench_vs_bare",
                 one_step_off: bool = False) -> SRPOConfig:
    """The one config both sides read (see the module docstring)."""
    overrides = ["stages=[{name: math, domains: [math]}]", "data.train_files=[builtin:arithmetic]",
                 f"trainer.total_steps={args.steps}", f"trainer.run_dir={run_dir}", "metrics.progress_bar=false",
                 "eval.files=[]"]  # evaluation is not part of a step (the bare loop has none)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.learner_ranks:
        # the learner gets the whole machine, as the bare loop does
        overrides += [f"learner.num_ranks={args.learner_ranks}",
                      f"learner.cpus_per_rank={max(1, cores() // args.learner_ranks)}"]
    overrides += args.set
    if one_step_off:
        overrides += ["rollout.one_step_off=true", "rollout.max_staleness=1"]
    return load_config(None, overrides)


def differences(cfg: SRPOConfig) -> list[str]:
    """Every way the two sides differ (the same: prompts, seeds, reward, advantages,
    batch, loss, optimizer, micro-batch, sampling and engine settings)."""
    from srpo_ray.weights.transport import resolve_for

    transport = resolve_for(cfg)
    ranks, threads = cfg.learner.num_ranks, max(1, int(cfg.learner.cpus_per_rank))
    return [
        f"processes: srpo-ray = a driver + Ray actors ({cfg.rollout.num_workers} vLLM generation worker(s), "
        f"{cfg.reward.num_workers} reward worker(s), {ranks} learner rank(s)); bare = one Python process",
        f"learner: srpo-ray = {learner_kind(cfg)} x {threads} torch thread(s) in Ray actor(s) at niceness 0, "
        "each rank sent its rows (lengths and object refs) and fetching their tokens from Ray's object store, "
        "per-token entropy (a metric, no graph) and "
        f"gathered metrics each step, gc.collect() after each step, {heap_kind(cfg)}; "
        f"bare = a plain HF module, {cores()} torch threads, glibc's default heap (blocks over 32 MiB freshly "
        "mapped, page-faulted in every step), only the loss's own metrics",
        f"generation: srpo-ray = prompts templated in the worker, the step cut into "
        f"{chunk_count(cfg.rollout.num_workers, 2)} chunk(s) (one vLLM call each; a single worker gets one), "
        f"results through Ray's object store, the generator's {heap_kind(cfg, 'rollout')}; bare = one "
        "llm.generate call with every prompt, glibc's default heap; same engine settings and per-prompt seeds "
        "on both",
        f"threads: srpo-ray generator OMP_NUM_THREADS={max(1, int(cfg.rollout.cpus_per_worker))}, OMP wait policy "
        f"{engine_env(cfg.rollout).get('OMP_WAIT_POLICY', 'default')}, generator and learner at niceness 0 "
        f"(other Ray workers 15); bare OMP_NUM_THREADS={cores()}, default wait policy, niceness 0",
        "rewards: srpo-ray = RewardScorer in reward-worker actor(s), groups sent through Ray; bare = the same "
        "RewardScorer in process",
        f"weight sync: srpo-ray = rank 0 gathers the full state dict, publishes it ({transport} transport, "
        f"{cfg.rollout.weight_bucket_mb:g} MiB buckets), the generator loads it and reports the version; "
        "bare = model.state_dict() passed straight to vLLM's reload_weights in the same process",
        f"bookkeeping in srpo-ray's step: rollouts.jsonl ({cfg.metrics.rollouts_per_step} groups), policy version "
        "checks, ledger stats; between steps metrics.jsonl/TensorBoard (outside every figure); bare: none",
        "start and end: srpo-ray's engine warms up at start and the run writes a checkpoint at the end (timed "
        "apart, in no figure); bare does neither; step 1 is left out on both sides",
        "prompts: the same HistoryLedger class and seed on both sides (same prompt ids per step until an epoch "
        "closes); sampled responses match at step 1 and part after the first update",
    ]


def learner_kind(cfg: SRPOConfig) -> str:
    ranks = cfg.learner.num_ranks
    if ranks == 1 and cfg.model.dtype in ("float32", "auto"):
        return "1 rank, the plain module (one float32 rank has nothing to shard)"
    return f"FSDP2 over {ranks} rank(s) (all-gather per layer per forward, reduce-scatter per backward)"


def heap_kind(cfg: SRPOConfig, role: str = "learner") -> str:
    from srpo_ray.host_heap import resolve_heap_policy

    section = getattr(cfg, role)
    on_gpu = (cfg.learner.gpus_per_rank if role == "learner" else cfg.rollout.gpus_per_worker) > 0
    policy = resolve_heap_policy(section.host_heap, on_gpu, f"{role}.host_heap")
    return {"reuse": f"{role}.host_heap=reuse (every block from a heap never trimmed: no page faults once it "
                     "fits a step)",
            "trim": f"{role}.host_heap=trim (glibc's default heap"
                    + (", malloc_trim after each step)" if role == "learner" else ")"),
            "compact": f"{role}.host_heap=compact (blocks of 1 MiB or more mapped alone"
                       + (", malloc_trim after each step)" if role == "learner" else ")")}[policy]


# ----------------------------------------------------------------------------- one side, in a child

def run_side(args: argparse.Namespace) -> dict:
    """This child's side: its step rows and, for srpo-ray, fit wall and checkpoint seconds."""
    if args.side == "bare":
        cfg = bench_config(args)
        check_bare_supports(cfg)
        return {"rows": run_bare(cfg)}
    one_step_off = args.side == "srpo-1off"
    with tempfile.TemporaryDirectory(prefix="bench_vs_bare_") as tmp:
        cfg = bench_config(args, run_dir=str(Path(tmp) / "run"), one_step_off=one_step_off)
        rows, wall, saves = run_job(cfg)
    rows = [r for r in rows if "time/step" in r]  # evaluation rows, if any, are not steps
    report(rows, wall, saves, WORK_OVERLAPPED if one_step_off else WORK)  # where srpo-ray's step goes
    return {"rows": rows, "fit_wall_s": wall, "checkpoint_s": saves}


def launch(side: str, argv: list[str]) -> dict | None:
    """Run one side in a child process of its own (its memory, threads and Ray go with
    it); None if it failed."""
    env = dict(os.environ)
    if side == "bare":
        # torch reads OMP_NUM_THREADS when first imported; vLLM pins one thread without it
        env.update(OMP_NUM_THREADS=str(cores()), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with tempfile.TemporaryDirectory(prefix="bench_vs_bare_") as tmp:
        result = Path(tmp) / "result.json"
        print(f"\n== {side} ==", flush=True)
        rc = subprocess.run([sys.executable, __file__, *argv, "--side", side, "--result", str(result)],
                            env=env).returncode
        if rc != 0 or not result.is_file():
            print(f"bench_vs_bare: the {side} side failed (exit {rc}); its column reads n/a", flush=True)
            return None
        return json.loads(result.read_text())


# ----------------------------------------------------------------------------- the table

def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """median/min/max per phase over steps 2.. (train figures: trained steps only)."""
    later = [dict(r) for r in rows if r["step"] > 1]
    for r in later:
        if "time/train" in r and r.get("batch/sequences"):
            r["train_per_sequence"] = r["time/train"] / r["batch/sequences"]
            if r.get("learner/response_tokens"):
                r["train_per_token"] = r["time/train"] / r["learner/response_tokens"]
        if "time/weight_load" in r:
            r["weight_sync_rest"] = r["time/weight_sync"] - r.get("time/weight_publish", 0.0) - r["time/weight_load"]
    out: dict[str, dict[str, float]] = {}
    for _, key in PHASES:
        values = [r[key] for r in later if key in r]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                        "count": len(values)}
    out["trained_steps"] = {"count": sum("time/train" in r for r in later), "of": len(later)}
    return out


def cell(summary: dict | None, key: str, scale: float) -> str:
    s = (summary or {}).get(key)
    if not s:
        return "n/a"
    return f"{s['median'] * scale:.3f} ({s['min'] * scale:.3f}-{s['max'] * scale:.3f})"


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    x, y = (a or {}).get(key), (b or {}).get(key)
    return f"{x['median'] / y['median']:.2f}x" if x and y and y["median"] > 0 else "n/a"


def print_table(results: dict[str, dict | None]) -> dict[str, dict | None]:
    summaries = {side: summarize(r["rows"]) if r else None for side, r in results.items()}
    others = [side for side in ("srpo", "srpo-1off") if side in summaries]
    print(f"\n{'phase (seconds; ms per seq/token)':<34} {'bare median (min-max)':>24} "
          + " ".join(f"{side + ' median (min-max)':>28} {side + '/bare':>14}" for side in others))
    for label, key in PHASES:
        scale = 1000.0 if key.startswith("train_per") else 1.0
        line = f"{label:<34} {cell(summaries.get('bare'), key, scale):>24} "
        line += " ".join(f"{cell(summaries[s], key, scale):>28} {ratio(summaries[s], summaries.get('bare'), key):>14}"
                         for s in others)
        print(line)
    trained = {s: (f"{v['trained_steps']['count']}/{v['trained_steps']['of']}" if v else "n/a")
               for s, v in summaries.items()}
    print(f"{'trained steps (of steps 2..)':<34} {trained.get('bare', 'n/a'):>24} "
          + " ".join(f"{trained[s]:>28} {'':>14}" for s in others))
    return summaries


def print_checks(results: dict[str, dict | None]) -> None:
    """Same task? Step 1 samples the same weights with the same seeds on every side; a
    working weight sync keeps vLLM's and the learner's log-probs together."""
    for side, r in results.items():
        if not r or not r["rows"]:
            continue
        first = r["rows"][0]
        # from step 2 on the sampler holds weights that were synced: this checks the sync
        gaps = [row["learner/logprob_mismatch"] for row in r["rows"][1:] if "learner/logprob_mismatch" in row]
        gap = f"{statistics.median(gaps):.2e}" if gaps else "n/a"
        print(f"{side}: step 1 reward mean {first.get('reward/mean', float('nan')):.4f}, zero-variance groups "
              f"{first.get('groups/zero_variance_frac', float('nan')):.2f}; median |vLLM - learner| log-prob "
              f"(steps 2..) {gap}")


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="training steps per side (step 1 is warm-up)")
    ap.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--learner-ranks", type=int, default=None,
                    help="srpo-ray's FSDP2 ranks, sharing the machine's cores (default: the config's)")
    ap.add_argument("--with-one-step-off", action="store_true",
                    help="also run srpo-ray with rollout.one_step_off=true rollout.max_staleness=1")
    ap.add_argument("--only", choices=("bare", "srpo"), default=None, help="run one side only")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for both sides, e.g. rollout.max_new_tokens=128")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child runs one side
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2: step 1 is warm-up and left out")
    if args.side:
        Path(args.result).write_text(json.dumps(run_side(args)))
        return

    cfg = bench_config(args)
    sides = [s for s in SIDES if args.only in (None, s.split("-")[0])
             and (s != "srpo-1off" or args.with_one_step_off)]
    if "bare" in sides:
        check_bare_supports(cfg)
    from srpo_ray.models import resolve_model_path
    resolve_model_path(cfg.model)  # convert the bundled model once, before either side starts
    diffs = differences(cfg)
    results = {side: launch(side, sys.argv[1:]) for side in sides}

    s = effective_settings(cfg)
    print(f"\n== srpo-ray vs a bare loop: {args.steps} steps each, steps 2.. compared ==\n{s}")
    print("differences:\n" + "\n".join(f"  - {d}" for d in diffs))
    summaries = print_table(results)
    print_checks(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": s, "overrides": args.set, "steps": args.steps,
                                               "differences": diffs, "summary": summaries,
                                               "sides": results}, indent=1))
        print(f"figures written to {args.json}")
    if any(r is None for r in results.values()):
        sys.exit(1)


def effective_settings(cfg: SRPOConfig) -> str:
    from srpo_ray.algo.stages import effective_sampling, prompts_per_step

    sp = effective_sampling(cfg.rollout, cfg.stages[0])
    return (f"model {cfg.model.path}; {prompts_per_step(cfg.trainer, cfg.stages[0])} prompts x n={sp.n} "
            f"at T={sp.temperature}, top_p={sp.top_p}, max_new_tokens={sp.max_new_tokens}; "
            f"lr {cfg.optim.lr:g}, micro-batch {cfg.learner.micro_batch_size}, loss {cfg.algo.loss_agg}; "
            f"learner {cfg.learner.num_ranks} rank(s) x {cfg.learner.cpus_per_rank:g} CPU; "
            f"data {list(cfg.data.train_files)}; {cores()} cores")


if __name__ == "__main__":
    main()
