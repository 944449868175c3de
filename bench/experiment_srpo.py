"""SRPO's effects at a scale where they can show: real training runs through the driver,
several seeds, held-out evaluation of every run.

    .venv/bin/python bench/experiment_srpo.py                       # 12 runs, ~2 hours on 2 cores
    .venv/bin/python bench/experiment_srpo.py --quick --seeds 1     # smoke test, ~20 min
    .venv/bin/python bench/experiment_srpo.py --runs math_hr,math_no_hr --seeds 1,2,3
    .venv/bin/python bench/experiment_srpo.py --report-only         # remake tables/plot from --out

Runs of `python -m srpo_ray.driver` (SmolLM2-135M-Instruct by default), each a config in
`run_specs` trained once per seed (`trainer.seed` and `rollout.seed`: data order and
sampling), then tables with the mean and the range over seeds, and a plot:

(a) History Resampling: the share of rollout groups with zero reward variance, math only,
    same step budget: HR on (SRPO), HR off (plain GRPO), and HR off with DAPO-style dynamic
    sampling (drop zero-variance groups, draw more prompts).
(b) Curriculum: math-only, code-only, mixed (math + code from the start) and two-stage
    (math, then math + code); response length by domain. The math-only run is (a)'s HR run.

Every run is evaluated after its last step on held-out problems (`builtin:arithmetic_heldout`,
disjoint from the training prompts, and `builtin:code_heldout`) with the project's own
evaluator; the first run also evaluates the initial model (the `base` row).

Data: the default run's (the first `math_prompts` problems of `builtin:arithmetic`, each after
one worked example, and the 8 short programs of `builtin:math_code`), so the pool is small
enough that each prompt is drawn several times and History Resampling acts on it.

Writes into --out (default bench/results/experiment/): results.md (the tables), summary.csv,
steps.csv (per run and step), experiment.png, metrics/<run>.jsonl, metrics/<run>.eval.json
(held-out scores) and runs.json (wall seconds, scale). Checkpoints are deleted after each
run; logs stay in --work-dir.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from experiment_report import write_report  # noqa: E402

from srpo_ray.data.builtin import arithmetic_rows, code_rows  # noqa: E402
from srpo_ray.data.parquet import write_verl_parquet  # noqa: E402

EVAL_FILES = "[builtin:arithmetic_heldout, builtin:code_heldout]"


@dataclass(frozen=True)
class Scale:
    steps: int
    prompts_per_step: int
    n: int
    max_new_tokens: int
    code_max_new_tokens: int
    temperature: float
    lr: float
    math_prompts: int
    max_rounds: int
    eval_problems: int
    eval_k: int


QUICK = Scale(steps=4, prompts_per_step=4, n=4, max_new_tokens=48, code_max_new_tokens=80, temperature=0.8,
              lr=2e-5, math_prompts=8, max_rounds=3, eval_problems=16, eval_k=2)
# 16 steps of 8 prompts over a 32-problem pool: about 4 epochs, History Resampling at the end of each.
FULL = Scale(steps=16, prompts_per_step=8, n=4, max_new_tokens=48, code_max_new_tokens=80, temperature=0.8,
             lr=2e-5, math_prompts=32, max_rounds=3, eval_problems=64, eval_k=4)


def stages(kind: str, scale: Scale) -> str:
    """A `stages=[...]` override (YAML flow list); stages with code get room for programs."""
    code = f"max_new_tokens: {scale.code_max_new_tokens}"
    return {
        "math": "[{name: math, domains: [math]}]",
        "code": f"[{{name: code, domains: [code], {code}}}]",
        "mixed": f"[{{name: math+code, domains: [math, code], {code}}}]",
        "two_stage": f"[{{name: math, domains: [math], until_steps: {max(1, scale.steps // 2)}}}, "
                     f"{{name: math+code, domains: [math, code], {code}}}]",
    }[kind]


def run_specs(scale: Scale) -> dict[str, list[str]]:
    """Config name -> overrides that make it what it is (on top of `common_overrides`)."""
    return {
        "math_hr": [f"stages={stages('math', scale)}"],
        "math_no_hr": [f"stages={stages('math', scale)}", "resample.enabled=false"],
        "math_dapo": [f"stages={stages('math', scale)}", "resample.enabled=false", "algo.dynamic_sampling=true",
                      f"algo.dynamic_sampling_max_rounds={scale.max_rounds}"],
        "code_only": [f"stages={stages('code', scale)}"],
        "mixed": [f"stages={stages('mixed', scale)}"],
        "two_stage": [f"stages={stages('two_stage', scale)}"],
    }


def common_overrides(scale: Scale, data: list[Path], run_dir: Path, model: str, seed: int,
                     eval_files: str = EVAL_FILES) -> list[str]:
    return [
        f"model.path={model}", f"data.train_files=[{', '.join(str(p) for p in data)}]",
        f"trainer.run_dir={run_dir}", f"trainer.total_steps={scale.steps}", f"trainer.seed={seed}",
        f"trainer.prompts_per_step={scale.prompts_per_step}", "trainer.save_every=0",
        f"rollout.n={scale.n}", f"rollout.max_new_tokens={scale.max_new_tokens}", f"rollout.seed={seed}",
        f"rollout.temperature={scale.temperature}", f"optim.lr={scale.lr}",
        "metrics.progress_bar=false", "metrics.trackers=[jsonl]", "metrics.rollouts_per_step=1000",
        f"eval.files={eval_files}", f"eval.max_problems_per_source={scale.eval_problems}", f"eval.k={scale.eval_k}",
        f"eval.temperature={scale.temperature}", "eval.top_p=1.0", "eval.at_start=false", "eval.at_end=true",
        f"eval.max_new_tokens={scale.code_max_new_tokens}",
    ]


def launch(name: str, overrides: list[str], run_dir: Path) -> float:
    """One training run in a fresh process (vLLM and Ray state do not leak between
    runs); its log goes to <run_dir>/driver.log. Returns wall seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: running ({run_dir}/driver.log)", flush=True)
    with open(run_dir / "driver.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "srpo_ray.driver", *overrides], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"run {name} failed (exit {code}); see {run_dir / 'driver.log'}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs of weights + optimizer state
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def copy_metrics(run_dir: Path, dest: Path) -> None:
    """metrics.jsonl plus, per step, the share of generated groups that were all correct
    and all wrong (`groups/all_correct_frac`, `groups/all_wrong_frac`), counted from
    rollouts.jsonl, which holds every group (metrics.rollouts_per_step is set high)."""
    outcomes: dict[int, list[int]] = {}
    rollouts = run_dir / "rollouts.jsonl"
    for line in rollouts.read_text().splitlines() if rollouts.exists() else []:
        group = json.loads(line)
        correct = [s["correct"] for s in group["samples"]]
        counts = outcomes.setdefault(group["step"], [0, 0, 0])
        counts[0] += all(correct)
        counts[1] += not any(correct)
        counts[2] += 1
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        all_correct, all_wrong, total = outcomes.get(row["step"], [0, 0, 0])
        if total:
            row.update({"groups/all_correct_frac": all_correct / total, "groups/all_wrong_frac": all_wrong / total})
        rows.append(json.dumps(row))
    dest.write_text("\n".join(rows) + "\n")


def copy_eval(run_dir: Path, dest_dir: Path, name: str) -> None:
    """The run's held-out scores (eval/step_*.json without the per-problem samples, except
    the first four texts of each source, kept so a reader sees what the policy writes):
    <name>.eval.json from the last evaluation, base.eval.json from a step-0 one."""
    for path in sorted((run_dir / "eval").glob("step_*.json")):
        report = json.loads(path.read_text())
        examples: dict[str, list[str]] = {}
        for problem in report.pop("problems", []):
            kept = examples.setdefault(problem["source"], [])
            if len(kept) < 4:
                kept.append(problem["texts"][0])
        report["examples"] = examples
        target = "base" if report["step"] == 0 else name
        (dest_dir / f"{target}.eval.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, small batches (a smoke test)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "experiment"),
                    help="tables, plot and metrics go here")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a new temporary folder)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model.path of every run")
    ap.add_argument("--runs", default=None, help="comma-separated subset of: " + ", ".join(run_specs(QUICK)))
    ap.add_argument("--seeds", default="1,2", help="comma-separated training seeds; each config runs once per seed")
    ap.add_argument("--steps", type=int, default=None, help="override the scale's step budget")
    ap.add_argument("--report-only", action="store_true",
                    help="only remake the tables and plot from --out's metrics/ and runs.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return report(out)

    scale = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"--steps must be >= 1, got {args.steps}")
        scale = Scale(**{**vars(scale), "steps": args.steps})
    specs = run_specs(scale)
    names = list(specs) if args.runs is None else [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in names if r not in specs]
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from {list(specs)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. --seeds 1,2")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="srpo_experiment_"))
    data = [work / "data" / "math.parquet", work / "data" / "code.parquet"]
    write_verl_parquet(arithmetic_rows()[:scale.math_prompts], data[0])
    write_verl_parquet(code_rows(), data[1])

    (out / "metrics").mkdir(parents=True, exist_ok=True)
    done = {"scale": f"{'quick' if args.quick else 'full'} scale: {vars(scale)}; model {args.model}",
            "seconds": {}}
    previous = out / "runs.json"
    if previous.exists() and json.loads(previous.read_text())["scale"] == done["scale"]:
        done = json.loads(previous.read_text())  # a subset re-run joins the other runs of the same scale
    need_base = not (out / "metrics" / "base.eval.json").exists() or not done["seconds"]
    # Seed-major order: an interrupted invocation leaves whole comparisons, not one config's seeds.
    for seed in seeds:
        for config in names:
            name = f"{config}.s{seed}"
            run_dir = work / "runs" / name
            overrides = [*common_overrides(scale, data, run_dir, args.model, seed), *specs[config]]
            if need_base:  # the initial model, evaluated once (evaluation has its own seeds)
                overrides.append("eval.at_start=true")
                need_base = False
            done["seconds"][name] = launch(name, overrides, run_dir)
            copy_metrics(run_dir, out / "metrics" / f"{name}.jsonl")
            copy_eval(run_dir, out / "metrics", name)
            (out / "runs.json").write_text(json.dumps(done, indent=1))
    return report(out)


def report(out: Path) -> int:
    """Tables and plot from out/metrics/ and out/runs.json (wall seconds, scale)."""
    done = json.loads((out / "runs.json").read_text())
    write_report(out, out / "metrics", done["seconds"], scale_note=done["scale"])
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
