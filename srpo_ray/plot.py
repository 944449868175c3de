"""`python -m srpo_ray.plot RUN_DIR [--out FILE]`: one PNG of RUN_DIR/metrics.jsonl that
shows whether a run learned: reward, correctness, zero-variance groups and response length
per domain, and the evaluation curves. Only matplotlib (no Ray, no torch), so it runs
anywhere a run directory was copied to."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

Records = dict[int, dict[str, float]]


class PlotError(Exception):
    """Bad input (no run dir, no parseable metrics) or no matplotlib: shown as one line."""


def read_metrics(path: str | Path) -> Records:
    """metrics.jsonl -> {step: {metric: value}}, steps ascending. Lines of the same step
    (a separate eval line, a resumed run repeating steps) are merged, the later line winning;
    "nan"/"inf" strings become floats. Unparseable lines (a run killed mid-write leaves a
    truncated last line) and non-numeric values are skipped."""
    records: Records = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = _number(row.get("step")) if isinstance(row, dict) else None
            if step is None or not step.is_integer():
                continue
            values = {k: _number(v) for k, v in row.items() if k != "step"}
            records.setdefault(int(step), {}).update(
                {k: v for k, v in values.items() if v is not None})
    return dict(sorted(records.items()))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)  # metrics.py writes non-finite floats as "nan" / "inf"
    except ValueError:
        return None


def series(records: Records, key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of one metric (a step without it, or with nan, is left out)."""
    points = [(s, m[key]) for s, m in records.items() if key in m and math.isfinite(m[key])]
    return [s for s, _ in points], [v for _, v in points]


def _per_domain(keys: set[str], prefix: str, suffix: str) -> list[tuple[str, str]]:
    """(label, key) for `prefix+suffix` (all domains) and each `prefix+<domain>/+suffix`."""
    pattern = re.compile(re.escape(prefix) + r"([^/]+)/" + re.escape(suffix))
    domains = sorted({m.group(1) for k in keys if (m := pattern.fullmatch(k))})
    return [("all", prefix + suffix)] + [(d, f"{prefix}{d}/{suffix}") for d in domains]


def _eval_keys(keys: set[str]) -> dict[str, dict[str, str]]:
    """source -> {"avg": key, "greedy": key, "pass": key}; avg@k and pass@K with the largest
    k. Split at the last "/" since sources may contain one (openai/gsm8k)."""
    found: dict[str, dict[str, tuple[int, str]]] = {}
    for key in keys:
        if not key.startswith("eval/") or key.count("/") < 2:
            continue
        source, metric = key[len("eval/"):].rsplit("/", 1)
        kind, _, k = metric.partition("@")
        if kind in ("avg", "pass", "greedy") and (kind == "greedy" or k.isdigit()):
            rank = int(k) if k.isdigit() else 0
            if rank >= found.setdefault(source, {}).get(kind, (-1, ""))[0]:
                found[source][kind] = (rank, key)
    return {s: {kind: key for kind, (_, key) in m.items()} for s, m in sorted(found.items())}


def _stage_switches(records: Records) -> list[tuple[int, float]]:
    steps, stages = series(records, "stage")
    return [(s, v) for s, v, prev in zip(steps[1:], stages[1:], stages) if v != prev]


def _draw(ax, records: Records, lines: list[tuple[str, str, dict]], title: str, empty: str) -> None:
    for label, key, style in lines:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl into one PNG (default RUN_DIR/plot.png); returns its path."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} not found: pass a run's trainer.run_dir")
    if not metrics.is_file():
        raise PlotError(f"{metrics} not found: pass the trainer.run_dir of a run "
                        "(the directory holding metrics.jsonl)")
    records = read_metrics(metrics)
    if not records:
        raise PlotError(f"{metrics} has no parseable lines with a \"step\": "
                        "plot a run that has logged at least one step")
    out = Path(out) if out is not None else run_dir / "plot.png"
    if not out.parent.is_dir():
        raise PlotError(f"--out {out}: directory {out.parent} does not exist; create it first")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise PlotError(f"matplotlib is needed to plot {run_dir}: pip install matplotlib") from e

    keys = set().union(*records.values())
    domains = {d for p in ("reward/", "correct/", "response_len/")
               for d, _ in _per_domain(keys, p, "mean")} - {"all"}
    # one colour per domain, the same in every panel
    colors = {"all": "black"} | {d: f"C{i}" for i, d in enumerate(sorted(domains))}
    fig = Figure(figsize=(15, 12), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, and no pyplot global state in the caller's process
    grid = fig.add_gridspec(3, 2)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i // 2, i % 2], sharex=axes[0]) for i in range(1, 4)]
    axes += [fig.add_subplot(grid[2, :], sharex=axes[0])]  # eval: sparse, gets the full width
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared: steps are whole
    for ax, prefix, title in zip(axes, ("reward/", "correct/", None, "response_len/"),
                                 ("reward (mean)", "verifier-correct fraction",
                                  "zero-variance groups (no gradient)", "response length (tokens)")):
        lines = ([("zero-variance share", "groups/zero_variance_frac", {"color": "C3"})]
                 if prefix is None else
                 [(d, k, {"color": colors[d], "lw": 2 if d == "all" else 1.2})
                  for d, k in _per_domain(keys, prefix, "mean")])
        _draw(ax, records, lines, title, "not logged in this run")

    evals = _eval_keys(keys)
    styles = {"avg": {"ls": "-", "marker": "o"}, "greedy": {"ls": "--", "marker": "x"},
              "pass": {"ls": ":", "marker": "^"}}
    lines = [(f"{source} {key.rsplit('/', 1)[1]}", key,
              {"color": "black" if source == "all" else f"C{i}", **styles[kind]})
             for i, (source, kinds) in enumerate(evals.items())
             for kind, key in ((kind, kinds[kind]) for kind in styles if kind in kinds)]
    _draw(axes[4], records, lines, "evaluation (avg@k solid, greedy dashed, pass@K dotted)",
          "no evaluation in this run")

    for step, stage in _stage_switches(records):
        for ax in axes:
            ax.axvline(step, color="0.5", lw=1, alpha=0.6)
            ax.text(step, 0.98, f" stage={stage:g}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=7, color="0.4")
    summary = []
    for source, kinds in evals.items():
        steps, values = series(records, kinds.get("avg", ""))
        if steps:
            avg = kinds["avg"].rsplit("/", 1)[1]
            summary.append(f"{source} {avg} {values[0]:.2f} -> {values[-1]:.2f}")
    steps = list(records)
    title = f"{run_dir.resolve().name}: steps {steps[0]}-{steps[-1]}"
    fig.suptitle("\n".join([title] + ["; ".join(summary[i:i + 3]) for i in range(0, len(summary), 3)]))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # a reader never sees half a PNG
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def try_plot_run(run_dir: str | Path) -> Path | None:
    """plot_run for the end of training: a finished run must not fail on its plot."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - any failure only costs the picture
        log.warning("no plot of %s: %s", run_dir, e)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srpo_ray.plot",
                                     description="One PNG showing whether a run learned.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's trainer.run_dir")
    parser.add_argument("--out", metavar="FILE", help="PNG to write (default RUN_DIR/plot.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except PlotError as e:
        print(f"srpo_ray.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
