"""History Resampling where it has something to do (issue 23): the pre-registered
experiment of bench/results/experiment_hr/PLAN.md, real training runs through the driver.

    .venv/bin/python bench/experiment_hr.py --prepass-problems 512   # pre-pass, then every run
    .venv/bin/python bench/experiment_hr.py --runs grpo,hr,dapo --seeds 1
    .venv/bin/python bench/experiment_hr.py --report-only

1. Difficulty pre-pass (`python -m srpo_ray.difficulty`, k = 16, training's sampling
   settings) over the first --prepass-problems problems of `builtin:arithmetic_wide`,
   unless --out already holds it (prepass_k16.parquet).
2. Pools, each --pool problems taken in id order (wide-0, wide-1, ...):
   - filtered: training data = the first problems up to the --pool-th whose pass rate lies
     in (0, 1), filtered at start-up by the run itself (`data.pass_rates` +
     `data.pass_rate_band=[0.01, 0.99]`: the real feature, not a pre-cut file);
   - unfiltered: the first --pool problems;
   - filtered_precut (the curriculum arms C): the filtered pool's problems written out
     already cut, because the 8 programs those arms add have no pass rate, and
     data.pass_rates needs one for every training prompt (the programs are not filtered).
3. Runs (ARMS), each once per seed (trainer.seed = rollout.seed), seed-major so an
   interrupted invocation leaves whole comparisons. A run whose metrics are in --out is
   not run again (the experiment spans sessions); --force re-runs.
4. Held-out avg@4 on the first 100 problems of `builtin:arithmetic_wide_heldout` every
   --eval-every steps and after the last (plus `builtin:code_heldout` for the curriculum
   arms), and once for the initial model.

Writes into --out: metrics/<arm>.s<seed>.jsonl (metrics + all-correct/all-wrong shares),
metrics/<arm>.s<seed>.evals.json (held-out scores at every evaluation, a few texts),
runs.json (wall seconds, scale), results.md, summary.csv and experiment_hr.png
(bench/experiment_hr_report.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from experiment_hr_report import write_report  # noqa: E402
from experiment_srpo import FULL, Scale, common_overrides, copy_metrics, launch, stages  # noqa: E402

from srpo_ray.data.builtin import arithmetic_wide_rows, code_rows  # noqa: E402
from srpo_ray.data.pass_rates import read_pass_rates  # noqa: E402
from srpo_ray.data.verl_rows import write_verl_parquet  # noqa: E402

K = 16
BAND = "[0.01, 0.99]"  # strictly between never and always solved at k = 16
HELD_OUT = "builtin:arithmetic_wide_heldout"
# 24 steps of 8 prompts over a 32-problem pool: 6 epochs, History Resampling at each end.
SCALE = Scale(**{**vars(FULL), "steps": 24, "math_prompts": 32, "eval_problems": 100})
NO_HR = ["resample.enabled=false"]

# arm -> (pool, with the 8 programs, overrides on top of the common ones)
ARMS: dict[str, tuple[str, bool, list[str]]] = {
    "grpo": ("filtered", False, NO_HR),
    "hr": ("filtered", False, []),
    "dapo": ("filtered", False, [*NO_HR, "algo.dynamic_sampling=true",
                                 f"algo.dynamic_sampling_max_rounds={SCALE.max_rounds}"]),
    "grpo_unfiltered": ("unfiltered", False, NO_HR),
    "hr_unfiltered": ("unfiltered", False, []),
    "hr_seeded_unfiltered": ("unfiltered", False, ["resample.seed_from={prepass}"]),
    "two_stage": ("filtered_precut", True, [f"stages={stages('two_stage', SCALE)}"]),
    "mixed": ("filtered_precut", True, [f"stages={stages('mixed', SCALE)}"]),
}
# The seeded arm is not run by default: the bundled model solves none of pool B every
# time at k = 16, so seeding removes nothing there (PLAN.md, amendment 5).
DEFAULT_RUNS = [arm for arm in ARMS if arm != "hr_seeded_unfiltered"]


def run_prepass(model: str, problems: int, path: Path, work: Path) -> None:
    """The difficulty pre-pass at training's sampling settings, written to `path`."""
    data = work / "data" / f"wide_first{problems}.parquet"
    write_verl_parquet(arithmetic_wide_rows()[:problems], data)
    print(f"[{time.strftime('%H:%M:%S')}] pre-pass: {problems} problems x {K} samples -> {path}", flush=True)
    code = subprocess.call([sys.executable, "-m", "srpo_ray.difficulty", "--model", model, "--data", str(data),
                            "--k", str(K), "--out", str(path), f"rollout.temperature={SCALE.temperature}",
                            f"rollout.max_new_tokens={SCALE.max_new_tokens}", "rollout.top_p=1.0"], cwd=REPO)
    if code != 0:
        raise SystemExit(f"the pre-pass failed (exit {code})")


def filtered_count(prepass: Path, pool: int) -> int:
    """How many problems, in id order, hold the first `pool` whose pass rate is in (0, 1)."""
    rates = read_pass_rates(prepass)
    ids = [row["extra_info"]["id"] for row in arithmetic_wide_rows()]
    kept = 0
    for count, prompt_id in enumerate(ids, start=1):
        if prompt_id not in rates:
            break
        kept += 0 < rates[prompt_id] < 1
        if kept == pool:
            return count
    raise SystemExit(f"the pre-pass {prepass} covers too few problems: {kept} in (0, 1), {pool} needed; "
                     "run it over more (--prepass-problems, after deleting the file)")


def write_pools(prepass: Path, pool: int, work: Path) -> dict[str, list[Path]]:
    """Training files per pool (see the module docstring)."""
    rows = arithmetic_wide_rows()
    files = {"filtered": work / "data" / "filtered.parquet", "unfiltered": work / "data" / "unfiltered.parquet",
             "filtered_precut": work / "data" / "filtered_precut.parquet", "code": work / "data" / "code.parquet"}
    candidates = rows[:filtered_count(prepass, pool)]
    write_verl_parquet(candidates, files["filtered"])
    rates = read_pass_rates(prepass)  # the same cut as data.pass_rate_band=BAND at k = 16
    write_verl_parquet([r for r in candidates if 0 < rates[r["extra_info"]["id"]] < 1], files["filtered_precut"])
    write_verl_parquet(rows[:pool], files["unfiltered"])
    write_verl_parquet(code_rows(), files["code"])
    return {pool_name: [files[pool_name], files["code"]] for pool_name in ("filtered", "unfiltered", "filtered_precut")}


def overrides_for(arm: str, pools: dict[str, list[Path]], prepass: Path, run_dir: Path, model: str, seed: int,
                  eval_every: int) -> list[str]:
    pool, with_code, extra = ARMS[arm]
    data = pools[pool] if with_code else pools[pool][:1]
    eval_files = f"[{HELD_OUT}, builtin:code_heldout]" if with_code else f"[{HELD_OUT}]"
    out = common_overrides(SCALE, data, run_dir, model, seed, eval_files=eval_files)
    out += [f"eval.every_steps={eval_every}", "eval.greedy=false"]
    if pool == "filtered":
        out += [f"data.pass_rates={prepass}", f"data.pass_rate_band={BAND}"]
    if not with_code:
        out.append(f"stages={stages('math', SCALE)}")
    return out + [o.replace("{prepass}", str(prepass)) for o in extra]


def copy_evals(run_dir: Path, dest: Path) -> dict:
    """Every held-out evaluation of a run: {"k", "steps": {step: scores by source},
    "examples": {step: the first 4 texts per source}} (so a reader sees what it writes)."""
    result: dict = {"k": None, "steps": {}, "examples": {}}
    for path in sorted((run_dir / "eval").glob("step_*.json")):
        report = json.loads(path.read_text())
        step, result["k"] = str(report["step"]), report["k"]
        result["steps"][step] = report["scores"]
        examples = result["examples"].setdefault(step, {})
        for problem in report.get("problems", []):
            kept = examples.setdefault(problem["source"], [])
            if len(kept) < 4:
                kept.append(problem["texts"][0])
    dest.write_text(json.dumps(result, indent=1))
    return result


def split_base(evals_path: Path, base_path: Path) -> None:
    """Move a run's step-0 evaluation (the initial model) into its own file."""
    evals = json.loads(evals_path.read_text())
    base = {"k": evals["k"], "steps": {"0": evals["steps"].pop("0")},
            "examples": {"0": evals["examples"].pop("0", {})}}
    base_path.write_text(json.dumps(base, indent=1))
    evals_path.write_text(json.dumps(evals, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "experiment_hr"))
    ap.add_argument("--work-dir", default=None, help="run directories (default: a new temporary folder)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--pool", type=int, default=SCALE.math_prompts, help="math problems per pool")
    ap.add_argument("--prepass-problems", type=int, default=512, help="problems the pre-pass samples")
    ap.add_argument("--eval-every", type=int, default=8, help="held-out evaluation every N steps")
    ap.add_argument("--force", action="store_true", help="re-run runs whose metrics are already in --out")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return report(out)
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := [r for r in names if r not in ARMS]:
        raise SystemExit(f"--runs: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="srpo_experiment_hr_"))
    prepass = out / f"prepass_k{K}.parquet"
    if not prepass.exists():
        run_prepass(args.model, args.prepass_problems, prepass, work)
    pools = write_pools(prepass, args.pool, work)

    (out / "metrics").mkdir(parents=True, exist_ok=True)
    scale_note = f"{vars(SCALE)}, pool {args.pool}, evaluation every {args.eval_every} steps; model {args.model}"
    done = {"scale": scale_note, "seconds": {}}
    if (out / "runs.json").exists():
        done = json.loads((out / "runs.json").read_text())
        if done["scale"] != scale_note:
            raise SystemExit(f"{out}/runs.json holds runs of another scale ({done['scale']}); use another --out")
    need_base = not (out / "metrics" / "base.evals.json").exists()
    for seed in seeds:
        for arm in names:
            name = f"{arm}.s{seed}"
            if name in done["seconds"] and not args.force:
                print(f"{name}: done earlier ({done['seconds'][name]:.0f} s), skipped", flush=True)
                continue
            run_dir = work / "runs" / name
            overrides = overrides_for(arm, pools, prepass.resolve(), run_dir, args.model, seed, args.eval_every)
            if need_base:  # the initial model, once (evaluation has its own seeds)
                overrides.append("eval.at_start=true")
            done["seconds"][name] = launch(name, overrides, run_dir)
            copy_metrics(run_dir, out / "metrics" / f"{name}.jsonl")
            copy_evals(run_dir, out / "metrics" / f"{name}.evals.json")
            if need_base:
                split_base(out / "metrics" / f"{name}.evals.json", out / "metrics" / "base.evals.json")
                need_base = False
            (out / "runs.json").write_text(json.dumps(done, indent=1))
    return report(out)


def report(out: Path) -> int:
    done = json.loads((out / "runs.json").read_text())
    write_report(out, done["seconds"], done["scale"], n=SCALE.n)  # samples per prompt, for "samples generated"
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
