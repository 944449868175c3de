"""Tables (markdown + CSV) and a plot from the runs of bench/experiment_srpo.py.

Reads each run's metrics.jsonl (one JSON object per step, see srpo_ray/metrics.py).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from statistics import mean

# (a) History Resampling vs none vs DAPO dynamic sampling; (b) response length by domain
ZERO_VARIANCE_RUNS = {"math_hr": "History Resampling (SRPO)", "math_no_hr": "no resampling (GRPO)",
                      "math_dapo": "DAPO dynamic sampling, no HR"}
LENGTH_RUNS = {"math_hr": "math only", "code_only": "code only", "mixed": "math + code",
               "two_stage": "two-stage (math, then math + code)"}
STEP_COLUMNS = ("stage", "epoch", "groups/count", "groups/zero_variance_frac", "collect/rounds",
                "collect/prompts_drawn", "collect/groups_kept", "batch/sequences", "pool/size", "pool/removed",
                "reward/mean", "correct/math/mean", "correct/code/mean", "response_len/math/mean",
                "response_len/code/mean", "time/step")


def load_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trained_groups(row: dict) -> float:
    """Groups with reward variance in the step's batch (those that carry a gradient)."""
    return row.get("adv/num_groups", 0.0) * (1.0 - row.get("adv/zero_variance_frac", 0.0))


def _group_share(rows: list[dict], key: str) -> float | None:
    """A per-step share of groups (e.g. groups/zero_variance_frac) over all the steps'
    groups together: steps weigh by their group count (HR steps at an epoch's end are small)."""
    counted = [(r[key], r["groups/count"]) for r in rows if key in r and r.get("groups/count")]
    total = sum(n for _, n in counted)
    return sum(v * n for v, n in counted) / total if total else None


def _avg(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return mean(values) if values else None


def _seconds(seconds: dict[str, float], name: str) -> int | None:
    return round(seconds[name]) if name in seconds else None


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def zero_variance_summary(runs: dict[str, list[dict]], seconds: dict[str, float]) -> tuple[list[str], list[list]]:
    header = ["run", "zero-var. frac (all steps)", "first half", "second half", "all correct", "all wrong",
              "groups trained / step",
              "prompts generated", "generated per trained group", "math correct (2nd half)", "pool at end",
              "wall s"]
    rows = []
    for name, label in ZERO_VARIANCE_RUNS.items():
        if name not in runs:
            continue
        steps = runs[name]
        half = len(steps) // 2
        trained = sum(trained_groups(r) for r in steps)
        generated = sum(r.get("groups/count", 0) for r in steps)
        zero_variance = "groups/zero_variance_frac"
        rows.append([label, _group_share(steps, zero_variance), _group_share(steps[:half], zero_variance),
                     _group_share(steps[half:], zero_variance), _group_share(steps, "groups/all_correct_frac"),
                     _group_share(steps, "groups/all_wrong_frac"), trained / len(steps), int(generated),
                     generated / trained if trained else None, _avg(steps[half:], "correct/math/mean"),
                     steps[-1].get("pool/size"), _seconds(seconds, name)])
    return header, rows


def length_summary(runs: dict[str, list[dict]], seconds: dict[str, float]) -> tuple[list[str], list[list]]:
    header = ["run", "math len: first step", "last step", "mean", "code len: first step", "last step", "mean",
              "math correct (2nd half)", "code correct (2nd half)", "wall s"]
    rows = []
    for name, label in LENGTH_RUNS.items():
        if name not in runs:
            continue
        steps = runs[name]
        half = len(steps) // 2
        row: list = [label]
        for domain in ("math", "code"):
            key = f"response_len/{domain}/mean"
            seen = [r for r in steps if key in r]
            row += [seen[0][key] if seen else None, seen[-1][key] if seen else None, _avg(seen, key)]
        row += [_avg(steps[half:], "correct/math/mean"), _avg(steps[half:], "correct/code/mean"),
                _seconds(seconds, name)]
        rows.append(row)
    return header, rows


def per_step_table(runs: dict[str, list[dict]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (run, metric, heading); one row per step."""
    present = [c for c in columns if c[0] in runs]
    last = max((len(runs[run]) for run, _, _ in present), default=0)
    rows = []
    for step in range(1, last + 1):
        row: list = [step]
        for run, key, _ in present:
            match = [r for r in runs[run] if r["step"] == step]
            row.append(match[0].get(key) if match else None)
        rows.append(row)
    return _table(["step", *[heading for _, _, heading in present]], rows)


def write_report(out: Path, metrics_files: dict[str, Path], seconds: dict[str, float], scale_note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: load_metrics(path) for name, path in metrics_files.items()}
    zv_header, zv_rows = zero_variance_summary(runs, seconds)
    len_header, len_rows = length_summary(runs, seconds)
    zv_steps = per_step_table(runs, [(n, "groups/zero_variance_frac", label)
                                     for n, label in ZERO_VARIANCE_RUNS.items()])
    len_steps = per_step_table(runs, [(n, f"response_len/{d}/mean", f"{label}: {d}")
                                      for n, label in LENGTH_RUNS.items() for d in ("math", "code")
                                      if any(f"response_len/{d}/mean" in r for r in runs.get(n, []))])
    text = "\n\n".join([
        "# SRPO experiment: History Resampling and response length by domain",
        f"Generated by `bench/experiment_srpo.py`; {scale_note}.",
        "## (a) Zero-variance groups per step, with and without History Resampling (math only)",
        "Zero-variance frac: share of the step's generated groups whose rewards are all equal "
        "(no gradient), over all groups of the steps; `all correct` and `all wrong` split it "
        "(all steps). "
        "History Resampling removes prompts that were all correct over an epoch; DAPO drops "
        "zero-variance groups and draws more prompts, so its batches hold only groups with "
        "variance, at the price of generating more (`generated per trained group`).",
        _table(zv_header, zv_rows), zv_steps,
        "## (b) Mean response length (tokens) by domain",
        _table(len_header, len_rows), len_steps,
    ]) + "\n"
    (out / "results.md").write_text(text)
    _write_csv(out / "summary.csv", [["table", *zv_header]] + [["a", *r] for r in zv_rows]
               + [["table", *len_header]] + [["b", *r] for r in len_rows])
    _write_csv(out / "steps.csv", [["run", "step", *STEP_COLUMNS]]
               + [[name, r["step"], *[r.get(k) for k in STEP_COLUMNS]] for name, rows in runs.items() for r in rows])
    plot(runs, out / "experiment.png")


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["" if v is None else v for v in row] for row in rows])


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for axis, key, title in ((left, "groups/zero_variance_frac", "(a) zero-variance groups (math)"),
                             (middle, "groups/all_correct_frac", "(a) all-correct groups (math)")):
        for name, label in ZERO_VARIANCE_RUNS.items():
            rows = [r for r in runs.get(name, []) if key in r]
            if rows:
                axis.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        axis.set(title=title, xlabel="step", ylabel="share of generated groups", ylim=(-0.05, 1.05))
        axis.legend(fontsize=8)
    for i, (name, label) in enumerate(LENGTH_RUNS.items()):
        for domain, style in (("math", "-"), ("code", "--")):
            key = f"response_len/{domain}/mean"
            rows = [r for r in runs.get(name, []) if key in r]
            if rows:
                right.plot([r["step"] for r in rows], [r[key] for r in rows], style, color=f"C{i}", marker=".",
                           label=f"{label}: {domain}")
    right.set(title="(b) mean response length by domain", xlabel="step", ylabel="tokens")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
