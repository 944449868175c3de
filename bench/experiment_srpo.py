"""SRPO's qualitative effects at small scale, with real training runs through the driver.

    .venv/bin/python bench/experiment_srpo.py --quick            # 17 min on 2 busy CPU cores
    .venv/bin/python bench/experiment_srpo.py                    # longer runs, same questions
    .venv/bin/python bench/experiment_srpo.py --quick --runs math_hr,math_no_hr --steps 4
    .venv/bin/python bench/experiment_srpo.py --report-only      # remake tables/plot from --out

Six runs of `python -m srpo_ray.driver` (SmolLM2-135M-Instruct by default) with config
overrides, then tables and a plot from their metrics.jsonl:

(a) History Resampling: the share of rollout groups with zero reward variance per step,
    math only, over the same step budget: HR on (SRPO), HR off (plain GRPO), and HR off
    with DAPO-style dynamic sampling (drop zero-variance groups, draw more prompts).
(b) Response length by domain: math-only, code-only, mixed (math + code from the start)
    and two-stage (math, then math + code) runs. The math-only run is (a)'s HR run.

Writes into --out (default bench/results/): results.md (the tables), summary.csv,
steps.csv (per run and step), experiment.png, metrics/<run>.jsonl and runs.json (wall
seconds, scale). Checkpoints are deleted after each run; logs stay in --work-dir.

Data. The experiment writes its own small prompt set: on the builtin set's prompts
SmolLM2-135M almost never writes \\boxed{} (reward ~0, every group zero-variance), so
there would be nothing to compare. Each prompt here opens with a worked example as an
earlier chat turn, which gets the model to answer in the checked format; the problems
range from ones it nearly always solves (single-digit sums, `double(x)`) to ones it
rarely does (two-digit sums, `count_vowels`). Runs sample at temperature 0.7: at 1.0 the
135M model is so noisy that hardly any prompt is solved every time, while History
Resampling is about the prompts a policy has mastered (the paper's 32B model solves
many training prompts in every rollout; that is where its zero-variance groups come from).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_report import write_report  # noqa: E402
from srpo_ray.data import write_verl_parquet  # noqa: E402

BOXED = "Put the final answer in \\boxed{}."
CODE = "Answer with a Python program in a ```python code block."
# A short system turn (it replaces the chat template's longer default) and one worked
# example: prompts of about 90 tokens, since on CPU the learner's cost grows with them.
SYSTEM = {"role": "system", "content": "Answer briefly."}
MATH_DEMO = [
    SYSTEM,
    {"role": "user", "content": f"What is 14 - 6? {BOXED}"},
    {"role": "assistant", "content": "14 - 6 = 8, so the answer is \\boxed{8}."},
]
CODE_DEMO = [
    SYSTEM,
    {"role": "user", "content": f"Write a Python function triple(x) that returns 3 times x. {CODE}"},
    {"role": "assistant", "content": "```python\ndef triple(x):\n    return 3 * x\n```"},
]


def function_task(signature: str, name: str, inputs: list, outputs: list) -> tuple[str, str]:
    """(question, ground truth) of a function-call task (TACO/PRIME encoding)."""
    return (f"Write a Python function {signature}. {CODE}",
            json.dumps({"fn_name": name, "inputs": inputs, "outputs": outputs}))


def stdin_task(question: str, cases: list[tuple[str, str]]) -> tuple[str, str]:
    """(question, ground truth) of a stdin/stdout task (LiveCodeBench encoding)."""
    return f"{question} {CODE}", json.dumps([{"input": i, "output": o, "testtype": "stdin"} for i, o in cases])


# Roughly easy to hard for SmolLM2-135M with the demonstrations above.
CODE_TASKS = [
    function_task("double(x) that returns 2 times x", "double", [[3], [-4]], [6, -8]),
    stdin_task("Read two integers a and b from one line of standard input and print a + b.",
               [("1 2\n", "3\n"), ("10 -4\n", "6\n")]),
    function_task("square(x) that returns x squared", "square", [[3], [-4]], [9, 16]),
    function_task("add(a, b) that returns the sum of a and b", "add", [[1, 2], [5, -7]], [3, -2]),
    function_task("first(xs) that returns the first element of the list xs", "first", [[[4, 5]], [["a"]]], [4, "a"]),
    stdin_task("Read an integer n from standard input and print n * 2.", [("4\n", "8\n"), ("-3\n", "-6\n")]),
    function_task("negate(x) that returns -x", "negate", [[3], [-4]], [-3, 4]),
    function_task("max_of(xs) that returns the largest number in the list xs", "max_of",
                  [[[1, 5, 3]], [[-2, -9]]], [5, -2]),
    function_task("sum_list(xs) that returns the sum of the numbers in the list xs", "sum_list",
                  [[[1, 5, 3]], [[]]], [9, 0]),
    function_task("is_even(n) that returns True if n is even, else False", "is_even", [[2], [7]], [True, False]),
    function_task("reverse(s) that returns the string s reversed", "reverse", [["abc"], ["x"]], ["cba", "x"]),
    stdin_task("Read an integer n from standard input and print n squared.", [("4\n", "16\n"), ("-3\n", "9\n")]),
    function_task("cube(x) that returns x cubed", "cube", [[2], [-3]], [8, -27]),
    function_task("factorial(n) that returns n factorial", "factorial", [[0], [5]], [1, 120]),
    stdin_task("Read a line of text from standard input and print it reversed.", [("abc\n", "cba\n")]),
    function_task("count_vowels(s) that returns the number of vowels (a, e, i, o, u) in the string s",
                  "count_vowels", [["hello"], ["sky"]], [2, 0]),
]


@dataclass(frozen=True)
class Scale:
    steps: int
    prompts_per_step: int
    n: int
    max_new_tokens: int
    temperature: float
    lr: float
    math_prompts: int
    code_prompts: int
    max_rounds: int


QUICK = Scale(steps=6, prompts_per_step=6, n=4, max_new_tokens=48, temperature=0.7, lr=2e-5, math_prompts=12,
              code_prompts=12, max_rounds=3)
FULL = Scale(steps=30, prompts_per_step=8, n=8, max_new_tokens=128, temperature=0.7, lr=1e-5, math_prompts=32,
             code_prompts=16, max_rounds=4)


def math_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` arithmetic problems cycling through four levels; at temperature 0.7 the
    base model solved about 75%, 90%, 50% and 20% of the samples of each level."""
    rng = random.Random(seed)
    levels = [lambda: (rng.randint(1, 9), "+", rng.randint(1, 9)),
              lambda: (rng.randint(2, 5), "*", rng.randint(2, 9)),
              lambda: (rng.randint(10, 30), "+", rng.randint(1, 9)),
              lambda: (rng.randint(10, 60), "+", rng.randint(2, 30))]
    rows = []
    for i in range(count):
        a, op, b = levels[i % 4]()
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append(_row("experiment/arithmetic", "math", MATH_DEMO, f"What is {a} {op} {b}? {BOXED}",
                         str(answer), f"math-{i}"))
    return rows


def code_rows(count: int) -> list[dict]:
    if not 1 <= count <= len(CODE_TASKS):
        raise SystemExit(f"between 1 and {len(CODE_TASKS)} code prompts are defined; asked for {count}")
    picked = [CODE_TASKS[i * len(CODE_TASKS) // count] for i in range(count)]  # spread over difficulty
    return [_row("experiment/code", "code", CODE_DEMO, question, truth, f"code-{i}")
            for i, (question, truth) in enumerate(picked)]


def _row(source: str, ability: str, demo: list[dict], question: str, truth: str, row_id: str) -> dict:
    return {"data_source": source, "ability": ability,
            "prompt": [*demo, {"role": "user", "content": question}],
            "reward_model": {"style": "rule", "ground_truth": truth}, "extra_info": {"id": row_id}}


def stages(kind: str, scale: Scale) -> str:
    """A `stages=[...]` override (YAML flow list)."""
    return {
        "math": "[{name: math, domains: [math]}]",
        "code": "[{name: code, domains: [code]}]",
        "mixed": "[{name: math+code, domains: [math, code]}]",
        "two_stage": f"[{{name: math, domains: [math], until_steps: {max(1, scale.steps // 2)}}}, "
                     "{name: math+code, domains: [math, code]}]",
    }[kind]


def run_specs(scale: Scale) -> dict[str, list[str]]:
    """Run name -> overrides that make it what it is (on top of `common_overrides`)."""
    return {
        "math_hr": [f"stages={stages('math', scale)}"],
        "math_no_hr": [f"stages={stages('math', scale)}", "resample.enabled=false"],
        "math_dapo": [f"stages={stages('math', scale)}", "resample.enabled=false", "algo.dynamic_sampling=true",
                      f"algo.dynamic_sampling_max_rounds={scale.max_rounds}"],
        "code_only": [f"stages={stages('code', scale)}"],
        "mixed": [f"stages={stages('mixed', scale)}"],
        "two_stage": [f"stages={stages('two_stage', scale)}"],
    }


def common_overrides(scale: Scale, data: list[Path], run_dir: Path, model: str) -> list[str]:
    return [
        f"model.path={model}", f"data.train_files=[{', '.join(str(p) for p in data)}]",
        f"trainer.run_dir={run_dir}", f"trainer.total_steps={scale.steps}",
        f"trainer.prompts_per_step={scale.prompts_per_step}", "trainer.save_every=0",
        f"rollout.n={scale.n}", f"rollout.max_new_tokens={scale.max_new_tokens}",
        f"rollout.temperature={scale.temperature}",
        "rollout.kv_cache_memory_bytes=536870912", f"optim.lr={scale.lr}",
        "metrics.progress_bar=false", "metrics.trackers=[jsonl]", "metrics.rollouts_per_step=1000",
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, small batches (15-20 min on 2 cores)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="tables, plot and metrics go here")
    ap.add_argument("--work-dir", default=None, help="run directories (default: a new temporary folder)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model.path of every run")
    ap.add_argument("--runs", default=None, help="comma-separated subset of: " + ", ".join(run_specs(QUICK)))
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
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="srpo_experiment_"))
    data = [work / "data" / "math.parquet", work / "data" / "code.parquet"]
    write_verl_parquet(math_rows(scale.math_prompts), data[0])
    write_verl_parquet(code_rows(scale.code_prompts), data[1])

    (out / "metrics").mkdir(parents=True, exist_ok=True)
    done = {"scale": f"{'quick' if args.quick else 'full'} scale: {vars(scale)}; model {args.model}",
            "seconds": {}}
    previous = out / "runs.json"
    if previous.exists() and json.loads(previous.read_text())["scale"] == done["scale"]:
        done = json.loads(previous.read_text())  # a subset re-run joins the other runs of the same scale
    for name in names:
        run_dir = work / "runs" / name
        done["seconds"][name] = launch(name, [*common_overrides(scale, data, run_dir, args.model), *specs[name]],
                                       run_dir)
        copy_metrics(run_dir, out / "metrics" / f"{name}.jsonl")
        (out / "runs.json").write_text(json.dumps(done, indent=1))
    return report(out)


def report(out: Path) -> int:
    """Tables and plot from out/metrics/<run>.jsonl and out/runs.json (wall seconds, scale)."""
    done = json.loads((out / "runs.json").read_text())
    write_report(out, {name: out / "metrics" / f"{name}.jsonl" for name in done["seconds"]}, done["seconds"],
                 scale_note=done["scale"])
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
