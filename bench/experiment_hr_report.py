"""Tables and a plot from the runs of bench/experiment_hr.py (issue 23's experiment).

Reads metrics/<arm>.s<seed>.jsonl and metrics/<arm>.s<seed>.evals.json (and
base.evals.json, the initial model) and writes results.md, summary.csv and
experiment_hr.png. Every figure: the mean over seeds with the range (min-max). The
reading rule of PLAN.md is applied mechanically: an arm beats another on an outcome only
where their seed ranges do not overlap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from experiment_report import _band, _fmt, _table, _write_csv, group_share, load_metrics, seeds_of, spread

MATH, CODE = "arithmetic_wide_heldout", "code_heldout"
LABELS = {
    "grpo": "A. GRPO (no HR), filtered pool", "hr": "A. History Resampling, filtered pool",
    "dapo": "A. DAPO dynamic sampling, filtered pool",
    "grpo_unfiltered": "B. GRPO, unfiltered pool", "hr_unfiltered": "B. History Resampling, unfiltered pool",
    "hr_seeded_unfiltered": "B. HR seeded from the pre-pass, unfiltered pool",
    "two_stage": "C. two-stage (math, then math + code)", "mixed": "C. mixed (math + code throughout)",
}
# Comparisons the plan names: (arm, against it); the seeded arm's is gone with the arm
# (PLAN.md, amendment 5).
COMPARISONS = [("hr", "grpo"), ("hr", "dapo"), ("dapo", "grpo"), ("hr_unfiltered", "grpo_unfiltered"),
               ("two_stage", "mixed")]
Runs = dict[str, list[dict]]


def final_score(evals: dict, source: str = MATH) -> Optional[float]:
    """avg@k at the run's last evaluation (after its last step)."""
    if not evals or not evals["steps"]:
        return None
    last = max(evals["steps"], key=int)
    return evals["steps"][last].get(source, {}).get(f"avg@{evals['k']}")


def samples_generated(rows: list[dict], n: int) -> float:
    return float(sum(r.get("groups/count", 0) for r in rows) * n)


def second_half_zero_variance(rows: list[dict]) -> Optional[float]:
    return group_share(rows[len(rows) // 2:], "groups/zero_variance_frac")


def per_epoch(rows: list[dict], key: str) -> dict[int, Optional[float]]:
    """A group share per epoch (steps weighed by their groups), or the last value of a
    level such as pool/size."""
    epochs = sorted({r["epoch"] for r in rows if "epoch" in r})
    if key == "pool/size":
        return {e: [r[key] for r in rows if r.get("epoch") == e and key in r][-1] for e in epochs}
    return {e: group_share([r for r in rows if r.get("epoch") == e], key) for e in epochs}


def prepass_summary(path: Path) -> str:
    """The pre-pass's pass rates in bins (what the pools are cut from)."""
    if not path.exists():
        return "(no pre-pass file)"
    from srpo_ray.data.pass_rates import read_pass_rates

    rates = list(read_pass_rates(path).values())
    bins = [("0 (never solved)", lambda r: r == 0), ("(0, 0.25]", lambda r: 0 < r <= 0.25),
            ("(0.25, 0.5]", lambda r: 0.25 < r <= 0.5), ("(0.5, 0.75]", lambda r: 0.5 < r <= 0.75),
            ("(0.75, 1)", lambda r: 0.75 < r < 1), ("1 (always solved)", lambda r: r == 1)]
    return _table(["pass rate", "problems"], [[name, sum(map(test, rates))] for name, test in bins])


def verdict(a: Optional[tuple], b: Optional[tuple], higher_is_better: bool, seeds: int = 3) -> str:
    """PLAN.md's reading rule on two (mean, min, max) spreads; `seeds`: the fewer seeds of
    the two arms (one seed has no spread to read)."""
    if a is None or b is None:
        return "not run yet"
    if seeds < 2:
        return f"{a[0]:.2f} vs {b[0]:.2f}: one seed, no reading yet"
    if a[1] > b[2]:
        return "higher, ranges apart" + (" (better)" if higher_is_better else " (worse)")
    if a[2] < b[1]:
        return "lower, ranges apart" + (" (worse)" if higher_is_better else " (better)")
    return "within seed spread"


def write_report(out: Path, seconds: dict[str, float], scale_note: str, n: int = 4) -> None:
    metrics = out / "metrics"
    runs: Runs = {name: load_metrics(metrics / f"{name}.jsonl") for name in seconds}
    evals = {name: json.loads((metrics / f"{name}.evals.json").read_text()) for name in seconds}
    base_path = metrics / "base.evals.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    base_math = final_score(base) if base else None
    arms = [a for a in LABELS if seeds_of(runs, a)]

    def arm_spread(arm: str, value) -> Optional[tuple]:
        return spread([value(name) for name in seeds_of(runs, arm)])

    def gain_per_1k(name: str) -> Optional[float]:
        score, used = final_score(evals[name]), samples_generated(runs[name], n)
        return None if score is None or base_math is None or not used else 1000 * (score - base_math) / used

    primary = {
        "held-out": lambda name: final_score(evals[name]),
        "zero-var 2nd half": lambda name: second_half_zero_variance(runs[name]),
    }
    header = ["arm", "seeds", "held-out math avg@4 (primary 1)", "zero-variance share, 2nd half (primary 2)",
              "all correct", "all wrong", "pool at end", "samples generated", "held-out gain per 1k samples",
              "held-out code avg@4", "wall s"]
    rows = [[LABELS[a], len(seeds_of(runs, a)), arm_spread(a, primary["held-out"]),
             arm_spread(a, primary["zero-var 2nd half"]),
             arm_spread(a, lambda r: group_share(runs[r], "groups/all_correct_frac")),
             arm_spread(a, lambda r: group_share(runs[r], "groups/all_wrong_frac")),
             arm_spread(a, lambda r: [x["pool/size"] for x in runs[r] if "pool/size" in x][-1]),
             arm_spread(a, lambda r: samples_generated(runs[r], n)), arm_spread(a, gain_per_1k),
             arm_spread(a, lambda r: final_score(evals[r], CODE)), arm_spread(a, seconds.get)] for a in arms]
    def reading(a: str, b: str, outcome: str, higher_is_better: bool) -> str:
        seeds = min(len(seeds_of(runs, a)), len(seeds_of(runs, b)))
        return verdict(arm_spread(a, primary[outcome]), arm_spread(b, primary[outcome]), higher_is_better, seeds)

    readings = [[f"{a} vs {b}", reading(a, b, "held-out", True), reading(a, b, "zero-var 2nd half", False)]
                for a, b in COMPARISONS]
    eval_steps = sorted({int(s) for e in evals.values() for s in e["steps"]})
    curves = [[LABELS[a], *[arm_spread(a, lambda r, s=s: evals[r]["steps"].get(str(s), {}).get(MATH, {})
                                       .get(f"avg@{evals[r]['k']}")) for s in eval_steps]] for a in arms]
    epochs = sorted({e for r in runs.values() for e in per_epoch(r, "pool/size")})
    # one row per epoch (History Resampling's shrinking pool makes many short epochs)
    by_epoch = {key: [[e, *[arm_spread(a, lambda r, e=e: per_epoch(runs[r], key).get(e)) for a in arms]]
                      for e in epochs]
                for key in ("groups/all_correct_frac", "groups/all_wrong_frac", "pool/size")}
    text = "\n\n".join([
        "# History Resampling where it has something to do: results (issue 23)",
        f"Generated by `bench/experiment_hr.py` (plan: PLAN.md, written before the runs); {scale_note}. "
        "Each cell: mean over seeds (min-max over seeds); every run is in metrics/.",
        f"Initial model, held-out math avg@4: {_fmt(base_math)}.",
        "## The pre-pass (prepass_k16.parquet: the first problems of builtin:arithmetic_wide, k = 16)",
        prepass_summary(out / "prepass_k16.parquet"),
        "## Primary and secondary outcomes after the last step",
        _table(header, rows),
        "## Reading rule (ranges apart, or within seed spread)",
        _table(["comparison", "held-out math avg@4", "zero-variance share, 2nd half"], readings),
        "## Held-out math avg@4 over steps",
        _table(["arm", *[f"step {s}" for s in eval_steps]], curves),
        *[part for key, title in (("groups/all_correct_frac", "All-correct share of generated groups per epoch"),
                                  ("groups/all_wrong_frac", "All-wrong share of generated groups per epoch"),
                                  ("pool/size", "Prompts in the pool at each epoch's last step"))
          for part in (f"## {title}", _table(["epoch", *arms], by_epoch[key]))],
        "## What the policies write (held-out, last evaluation, seed 1)",
        examples(evals, base),
    ]) + "\n"
    (out / "results.md").write_text(text)
    _write_csv(out / "summary.csv", [["arm_key", *header]] + [[a, *[(v[0] if isinstance(v, tuple) else v)
                                                                    for v in row]] for a, row in zip(arms, rows)])
    plot(runs, evals, base_math, out / "experiment_hr.png")


def examples(evals: dict, base: Optional[dict]) -> str:
    lines = []
    for label, report in [("initial model", base), *[(name, e) for name, e in sorted(evals.items())
                                                     if name.endswith(".s1")]]:
        if not report or not report["examples"]:
            continue
        last = max(report["examples"], key=int)
        for source, texts in report["examples"][last].items():
            lines.append(f"- **{label}**, {source}: " + " / ".join(json.dumps(t)[:160] for t in texts[:2]))
    return "\n".join(lines)


def plot(runs: Runs, evals: dict, base_math: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 4.8))
    arms = [a for a in LABELS if seeds_of(runs, a)]
    curves = {name: [{"step": int(s), "held_out": sc.get(MATH, {}).get(f"avg@{e['k']}")}
                     for s, sc in e["steps"].items()] for name, e in evals.items()}
    curves = {name: [row for row in rows if row["held_out"] is not None] for name, rows in curves.items()}
    for i, arm in enumerate(arms):
        style = {"color": f"C{i}", "label": arm}
        _band(axes[0], curves, arm, "held_out", **style)
        _band(axes[1], runs, arm, "groups/zero_variance_frac", **style)
        _band(axes[2], runs, arm, "groups/all_correct_frac", **style)
        _band(axes[3], runs, arm, "pool/size", **style)
    if base_math is not None:
        axes[0].axhline(base_math, color="grey", linestyle=":", label="initial model")
    for axis, title in zip(axes, ("held-out math avg@4", "zero-variance share of generated groups",
                                  "all-correct share of generated groups", "prompts in the pool")):
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize=7)
    fig.suptitle("lines: mean over seeds; bands: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

