"""Tables (markdown + CSV) and a plot from the runs of bench/experiment_srpo.py.

Reads each run's metrics/<config>.s<seed>.jsonl (one JSON object per step, see
srpo_ray/telemetry/metrics.py) and metrics/<config>.s<seed>.eval.json (held-out scores after the
last step); every figure is shown as the mean over seeds with the range (min-max).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from statistics import mean
from typing import Callable, Optional

# (a) History Resampling vs none vs DAPO dynamic sampling; (b) the curriculum
ZERO_VARIANCE_RUNS = {"math_hr": "History Resampling (SRPO)", "math_no_hr": "no resampling (GRPO)",
                      "math_dapo": "DAPO dynamic sampling, no HR"}
CURRICULUM_RUNS = {"math_hr": "math only", "code_only": "code only", "mixed": "math + code",
                   "two_stage": "two-stage (math, then math + code)"}
LABELS = {**CURRICULUM_RUNS, **ZERO_VARIANCE_RUNS}
MATH, CODE = "arithmetic_heldout", "code_heldout"
STEP_COLUMNS = ("stage", "epoch", "groups/count", "groups/zero_variance_frac", "groups/all_correct_frac",
                "collect/rounds", "collect/prompts_drawn", "collect/groups_kept", "batch/sequences", "pool/size",
                "pool/removed", "reward/mean", "correct/math/mean", "correct/code/mean", "response_len/math/mean",
                "response_len/code/mean", "time/step")

Runs = dict[str, list[dict]]  # run name (config.sSEED) -> its metrics rows


def load_metrics(path: Path) -> list[dict]:
    """The training steps' rows (evaluation rows, which share a step number, are left out:
    held-out scores are read from the .eval.json files)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if not any(key.startswith("eval/") for key in r)]


def config_of(run: str) -> str:
    return run.rsplit(".s", 1)[0]


def seeds_of(runs: dict, config: str) -> list[str]:
    return sorted(r for r in runs if config_of(r) == config)


def trained_groups(row: dict) -> float:
    """Groups with reward variance in the step's batch (those that carry a gradient)."""
    return row.get("adv/num_groups", 0.0) * (1.0 - row.get("adv/zero_variance_frac", 0.0))


def group_share(rows: list[dict], key: str) -> Optional[float]:
    """A per-step share of groups (e.g. groups/zero_variance_frac) over all the steps'
    groups together: steps weigh by their group count (HR steps at an epoch's end are small)."""
    counted = [(r[key], r["groups/count"]) for r in rows if key in r and r.get("groups/count")]
    total = sum(n for _, n in counted)
    return sum(v * n for v, n in counted) / total if total else None


def _first_last(rows: list[dict], key: str, last: bool) -> Optional[float]:
    seen = [r[key] for r in rows if key in r]
    return (seen[-1] if last else seen[0]) if seen else None


def _score(evals: dict, run: str, source: str, name: str) -> Optional[float]:
    report = evals.get(run)
    return report["scores"].get(source, {}).get(name) if report else None


def spread(values: list[Optional[float]]) -> Optional[tuple[float, float, float]]:
    """(mean, min, max) over seeds of the values that exist."""
    present = [v for v in values if v is not None]
    return (mean(present), min(present), max(present)) if present else None


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        average, low, high = value
        return f"{average:.{digits}f}" if low == high else f"{average:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(runs: Runs, seconds: dict, configs: dict[str, str],
                 columns: list[tuple[str, Callable[[str], Optional[float]]]]) -> tuple[list[str], list[list]]:
    """One row per config present: each column's per-seed value -> (mean, min, max)."""
    header = ["run", "seeds", *[heading for heading, _ in columns], "wall s"]
    rows = []
    for config, label in configs.items():
        names = seeds_of(runs, config)
        if names:
            rows.append([label, len(names), *[spread([value(n) for n in names]) for _, value in columns],
                         spread([seconds.get(n) for n in names])])
    return header, rows


def zero_variance_columns(runs: Runs, evals: dict) -> list:
    def half(run: str, second: bool) -> list[dict]:
        steps = runs[run]
        return steps[len(steps) // 2:] if second else steps[:len(steps) // 2]

    def generated_per_trained(run: str) -> Optional[float]:
        trained = sum(trained_groups(r) for r in runs[run])
        return sum(r.get("groups/count", 0) for r in runs[run]) / trained if trained else None

    zero = "groups/zero_variance_frac"
    return [
        ("zero-var. frac", lambda r: group_share(runs[r], zero)),
        ("first half", lambda r: group_share(half(r, False), zero)),
        ("second half", lambda r: group_share(half(r, True), zero)),
        ("all correct", lambda r: group_share(runs[r], "groups/all_correct_frac")),
        ("all wrong", lambda r: group_share(runs[r], "groups/all_wrong_frac")),
        ("groups generated", lambda r: float(sum(x.get("groups/count", 0) for x in runs[r]))),
        ("generated per trained group", generated_per_trained),
        ("pool at end", lambda r: _first_last(runs[r], "pool/size", last=True)),
        ("held-out math avg@k", lambda r: _score(evals, r, MATH, _avg_name(evals, r))),
        ("held-out math greedy", lambda r: _score(evals, r, MATH, "greedy")),
    ]


def curriculum_columns(runs: Runs, evals: dict) -> list:
    def length(domain: str, last: bool):
        return lambda r: _first_last(runs[r], f"response_len/{domain}/mean", last)

    return [
        ("math len: first step", length("math", False)), ("last step", length("math", True)),
        ("code len: first step", length("code", False)), ("last step", length("code", True)),
        ("held-out math avg@k", lambda r: _score(evals, r, MATH, _avg_name(evals, r))),
        ("held-out code avg@k", lambda r: _score(evals, r, CODE, _avg_name(evals, r))),
        ("held-out code pass@k", lambda r: _score(evals, r, CODE, _avg_name(evals, r).replace("avg", "pass"))),
    ]


def _avg_name(evals: dict, run: str) -> str:
    return f"avg@{evals[run]['k']}" if run in evals else "avg@?"


def eval_table(runs: Runs, evals: dict) -> tuple[list[str], list[list]]:
    """Held-out scores after the last step per config (mean and range over seeds), the
    initial model first."""
    names = [("avg@k", "avg"), ("maj@k", "maj"), ("pass@k", "pass"), ("greedy", "greedy"),
             ("answered", "answered_frac"), ("len", "response_len")]
    header = ["policy", "seeds"] + [f"math {h}" for h, _ in names] + [f"code {h}" for h, _ in names
                                                                      if h not in ("maj@k",)]

    def value(run: str, source: str, short: str) -> Optional[float]:
        if short in ("avg", "maj", "pass"):
            return _score(evals, run, source, f"{short}@{evals[run]['k']}") if run in evals else None
        return _score(evals, run, source, short)

    def row(label: str, names_of_runs: list[str]) -> list:
        cells = [spread([value(r, MATH, s) for r in names_of_runs]) for _, s in names]
        cells += [spread([value(r, CODE, s) for r in names_of_runs]) for h, s in names if h != "maj@k"]
        return [label, len(names_of_runs), *cells]

    rows = [row("initial model (before training)", ["base"])] if "base" in evals else []
    rows += [row(label, seeds_of(runs, c)) for c, label in LABELS.items() if seeds_of(runs, c)]
    return header, rows


def per_step_table(runs: Runs, columns: list[tuple[str, str, str]]) -> str:
    """columns: (config, metric, heading); one row per step, each cell the mean over seeds."""
    present = [c for c in columns if seeds_of(runs, c[0])]
    last = max((r["step"] for config, _, _ in present for n in seeds_of(runs, config) for r in runs[n]), default=0)
    rows = []
    for step in range(1, last + 1):
        row: list = [step]
        for config, key, _ in present:
            values = [r.get(key) for n in seeds_of(runs, config) for r in runs[n] if r["step"] == step]
            row.append(spread([v for v in values if v is not None]))
        rows.append(row)
    return _table(["step", *[heading for _, _, heading in present]], rows)


def examples(evals: dict) -> str:
    """The first held-out samples of the initial model and of each config's first seed."""
    lines = []
    for run in ["base", *sorted(r for r in evals if r != "base" and r.endswith(".s1"))]:
        label = "initial model" if run == "base" else f"{LABELS.get(config_of(run), run)} ({run})"
        for source, texts in evals[run].get("examples", {}).items():
            shown = " / ".join(json.dumps(t)[:160] for t in texts[:2])
            lines.append(f"- **{label}**, {source}: {shown}")
    return "\n".join(lines)


def write_report(out: Path, metrics_dir: Path, seconds: dict[str, float], scale_note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: load_metrics(metrics_dir / f"{name}.jsonl") for name in seconds}
    evals = {p.name[:-len(".eval.json")]: json.loads(p.read_text()) for p in metrics_dir.glob("*.eval.json")}
    evals = {n: e for n, e in evals.items() if n == "base" or n in runs}
    zv_header, zv_rows = summary_rows(runs, seconds, ZERO_VARIANCE_RUNS, zero_variance_columns(runs, evals))
    cur_header, cur_rows = summary_rows(runs, seconds, CURRICULUM_RUNS, curriculum_columns(runs, evals))
    ev_header, ev_rows = eval_table(runs, evals)
    zv_steps = per_step_table(runs, [(c, "groups/zero_variance_frac", label) for c, label in ZERO_VARIANCE_RUNS.items()]
                              + [(c, "pool/size", f"pool: {label}") for c, label in ZERO_VARIANCE_RUNS.items()])
    len_steps = per_step_table(runs, [(c, f"response_len/{d}/mean", f"{label}: {d}")
                                      for c, label in CURRICULUM_RUNS.items() for d in ("math", "code")
                                      if any(f"response_len/{d}/mean" in r for n in seeds_of(runs, c)
                                             for r in runs[n])])
    text = "\n\n".join([
        "# SRPO experiment: History Resampling and the two-stage curriculum",
        f"Generated by `bench/experiment_srpo.py`; {scale_note}. Each cell: mean over seeds "
        "(min-max over seeds).",
        "## Held-out evaluation after the last step",
        "Held-out problems the runs never trained on: `builtin:arithmetic_heldout` (strict number "
        "answers) and `builtin:code_heldout` (12 short programs), k samples at the training "
        "temperature plus one greedy decode.",
        _table(ev_header, ev_rows),
        "## (a) Zero-variance groups, with and without History Resampling (math only)",
        "Zero-variance frac: share of the generated groups whose rewards are all equal (no "
        "gradient), over all groups of the steps; `all correct` and `all wrong` split it. "
        "History Resampling removes prompts that were all correct over an epoch; DAPO drops "
        "zero-variance groups and draws more prompts, so its batches hold only groups with "
        "variance, at the price of generating more (`generated per trained group`).",
        _table(zv_header, zv_rows), zv_steps,
        "## (b) Curriculum: response length (tokens) by domain and held-out scores",
        _table(cur_header, cur_rows), len_steps,
        "## What the policies write (first held-out samples)",
        examples(evals),
    ]) + "\n"
    (out / "results.md").write_text(text)
    flat = [[(v[0] if isinstance(v, tuple) else v) for v in row] for row in zv_rows + cur_rows + ev_rows]
    _write_csv(out / "summary.csv", [["table", *zv_header]] + [["a", *r] for r in flat[:len(zv_rows)]]
               + [["table", *cur_header]] + [["b", *r] for r in flat[len(zv_rows):len(zv_rows) + len(cur_rows)]]
               + [["table", *ev_header]] + [["eval", *r] for r in flat[len(zv_rows) + len(cur_rows):]])
    _write_csv(out / "steps.csv", [["run", "step", *STEP_COLUMNS]]
               + [[name, r["step"], *[r.get(k) for k in STEP_COLUMNS]] for name, rows in runs.items() for r in rows])
    plot(runs, evals, out / "experiment.png")


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["" if v is None else v for v in row] for row in rows])


def _band(axis, runs: Runs, config: str, key: str, **style) -> None:
    """Mean over seeds per step as a line, the seeds' range as a shaded band."""
    by_step: dict[int, list[float]] = {}
    for name in seeds_of(runs, config):
        for r in runs[name]:
            if key in r:
                by_step.setdefault(r["step"], []).append(r[key])
    if not by_step:
        return
    steps = sorted(by_step)
    axis.plot(steps, [mean(by_step[s]) for s in steps], marker=".", **style)
    axis.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                      alpha=0.15, color=style.get("color"))


def _held_out_bars(axis, runs: Runs, evals: dict) -> None:
    """Held-out math and code avg@k after the last step per config: bar = mean over
    seeds, whisker = range; the initial model as horizontal lines."""
    configs = [c for c in LABELS if seeds_of(runs, c)]
    for offset, (source, color) in ((-0.2, (MATH, "C0")), (0.2, (CODE, "C1"))):
        spreads = [spread([_score(evals, n, source, _avg_name(evals, n)) for n in seeds_of(runs, c)]) or (0, 0, 0)
                   for c in configs]
        xs = [i + offset for i in range(len(configs))]
        axis.bar(xs, [m for m, _, _ in spreads], width=0.4, color=color, alpha=0.8,
                 label=f"{source} avg@k", yerr=[[m - lo for m, lo, _ in spreads], [hi - m for m, _, hi in spreads]])
        if "base" in evals:
            axis.axhline(_score(evals, "base", source, _avg_name(evals, "base")) or 0, color=color, linestyle=":",
                         label=f"{source}: initial model")
    axis.set_xticks(range(len(configs)), [c.replace("_", " ") for c in configs], rotation=20, fontsize=8)
    axis.set(title="held-out avg@k after the last step", ylabel="avg@k", ylim=(0, 1))
    axis.legend(fontsize=7)


def plot(runs: Runs, evals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(27, 4.8))
    for axis, key, title, ylabel, ylim in (
            (axes[0], "groups/zero_variance_frac", "(a) zero-variance groups (math)", "share of generated groups",
             (-0.05, 1.05)),
            (axes[1], "groups/all_correct_frac", "(a) all-correct groups (math)", "share of generated groups",
             (-0.05, 1.05)),
            (axes[2], "pool/size", "(a) prompts left in the pool", "prompts", None)):
        for i, (config, label) in enumerate(ZERO_VARIANCE_RUNS.items()):
            _band(axis, runs, config, key, color=f"C{i}", label=label)
        axis.set(title=title, xlabel="step", ylabel=ylabel)
        if ylim:
            axis.set_ylim(*ylim)
        axis.legend(fontsize=8)
    for i, (config, label) in enumerate(CURRICULUM_RUNS.items()):
        for domain, line in (("math", "-"), ("code", "--")):
            _band(axes[3], runs, config, f"response_len/{domain}/mean", color=f"C{i}", linestyle=line,
                  label=f"{label}: {domain}")
    axes[3].set(title="(b) mean response length by domain", xlabel="step", ylabel="tokens")
    axes[3].legend(fontsize=7)
    _held_out_bars(axes[4], runs, evals)
    fig.suptitle("lines: mean over seeds; bands: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
