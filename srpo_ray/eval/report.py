"""Evaluation results as files and tables: results.json (scores, settings and every
problem's samples), results.md (one markdown table), and the before/after table a
training run prints at its end."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from srpo_ray.eval.runner import EvalReport

SCORE_ORDER = ("avg@", "pass@", "maj@", "greedy", "answered_frac", "response_len", "truncated_frac", "problems")


def ordered_names(scores: dict[str, float]) -> list[str]:
    """Score names in reading order: avg@k first, then pass@K ascending, maj@k, greedy..."""
    def rank(name: str) -> tuple[int, int]:
        for i, prefix in enumerate(SCORE_ORDER):
            if name.startswith(prefix):
                tail = name[len(prefix):]
                return i, int(tail) if tail.isdigit() else 0
        return len(SCORE_ORDER), 0
    return sorted(scores, key=rank)


def markdown_table(report: EvalReport) -> str:
    names: list[str] = []
    for scores in report.scores.values():
        names += [n for n in ordered_names(scores) if n not in names]
    lines = ["| source | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for source, scores in report.scores.items():
        lines.append(f"| {source} | " + " | ".join(_fmt(scores.get(n)) for n in names) + " |")
    return "\n".join(lines)


def headline(report: EvalReport) -> str:
    """One line: each source's avg@k (and greedy), e.g. for a progress bar."""
    parts = []
    for source, scores in report.scores.items():
        main = f"{source} avg@{report.k}={scores[f'avg@{report.k}']:.3f}"
        parts.append(main + (f" greedy={scores['greedy']:.3f}" if "greedy" in scores else ""))
    return "; ".join(parts)


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Each source's main scores at two evaluations (results.json / eval.json dicts:
    `step`, `k`, `scores`) and their difference."""
    k = after["k"]
    lines = [f"| source | score | step {before['step']} | step {after['step']} | change |",
             "|---|---|---|---|---|"]
    for source, scores in after["scores"].items():
        old = before["scores"].get(source, {})
        for name in ordered_names(scores):
            if name.startswith(("avg@", "maj@", "greedy", "answered_frac", "response_len")) or name == f"pass@{k}":
                a, b = old.get(name), scores[name]
                change = "" if a is None else f"{b - a:+.3f}"
                lines.append(f"| {source} | {name} | {_fmt(a)} | {_fmt(b)} | {change} |")
    return "\n".join(lines)


def run_summary(eval_dir: str | Path) -> Optional[str]:
    """The before/after table of a run's first and last evaluation (eval/step_*.json);
    None with fewer than two. Also written to eval/summary.md."""
    files = sorted(Path(eval_dir).glob("step_*.json"))
    if len(files) < 2:
        return None
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    table = before_after_table(first, last)
    _write_atomic(Path(eval_dir) / "summary.md", f"# Held-out evaluation, first vs last\n\n{table}\n")
    return table


def write_report(report: EvalReport, directory: str | Path, header: Optional[dict[str, Any]] = None) -> Path:
    """results.json and results.md in `directory` (written atomically); returns the json path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {**(header or {}), **report.to_json()}
    _write_atomic(directory / "results.json", json.dumps(data, indent=1))
    title = ", ".join(f"{k}: {v}" for k, v in (header or {}).items())
    text = (f"# Evaluation\n\n{title}\n\nk={report.k} samples per problem at temperature "
            f"{report.temperature}; avg@k is pass@1 averaged over the k samples.\n\n{markdown_table(report)}\n")
    _write_atomic(directory / "results.md", text)
    return directory / "results.json"


def write_json(data: Any, path: str | Path) -> None:
    _write_atomic(Path(path), json.dumps(data, indent=1))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() and value > 1 else f"{value:.3f}"
