"""srpo_ray.plot: reading a messy metrics.jsonl, the PNG, and the CLI's error messages."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from srpo_ray.plot import main, plot_run, read_metrics, series, try_plot_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_line(step: int) -> dict:
    stage = 0 if step <= 6 else 1  # code prompts only in stage 2 (index 1)
    row = {"step": step, "stage": stage, "reward/mean": 0.1 * step, "reward/math/mean": 0.1 * step,
           "correct/mean": 0.05 * step, "correct/math/mean": 0.05 * step,
           "groups/zero_variance_frac": 0.5 - 0.02 * step,
           "response_len/mean": 100 + 10 * step, "response_len/math/mean": 100 + 10 * step,
           "time/step": 1.5}
    if stage == 1:
        row.update({"reward/code/mean": 0.2, "correct/code/mean": 0.1, "response_len/code/mean": 300})
    return row


def _eval_line(step: int) -> dict:
    row = {"step": step}
    for source, base in (("arithmetic_heldout", 0.03), ("humaneval", 0.1), ("all", 0.05)):
        row.update({f"eval/{source}/avg@4": base + 0.018 * step, f"eval/{source}/pass@1": base,
                    f"eval/{source}/pass@4": base + 0.1, f"eval/{source}/pass@16": base + 0.3,
                    f"eval/{source}/maj@4": base, f"eval/{source}/greedy": base + 0.01 * step,
                    f"eval/{source}/response_len": 200.0, f"eval/{source}/truncated_frac": 0.0})
    return row


def _write_messy_run(run_dir: Path) -> None:
    lines = [json.dumps(_eval_line(0))]  # step 0: eval only, before training
    for step in range(1, 11):
        row = _train_line(step)
        if step == 10:
            row.update(_eval_line(10))  # eval merged into the training line
        lines.append(json.dumps(row))
        if step == 5:
            lines.append(json.dumps(_eval_line(5)))  # eval as a separate line of the same step
    lines.insert(4, json.dumps({**_train_line(3), "reward/mean": -1.0}))  # resumed: step 3 again...
    lines.insert(5, json.dumps({**_train_line(3), "reward/mean": 0.33}))  # ...the later line wins
    lines.append(json.dumps({"step": 11, "reward/mean": "nan", "learner/loss": "inf"}))
    lines.append("not json at all")
    lines.append('{"step": 12, "reward/mean": 0.9, "correct/me')  # killed mid-write
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


def test_read_metrics_merges_steps_and_skips_bad_lines(tmp_path):
    _write_messy_run(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert list(records) == list(range(0, 12))  # step 12's truncated line is gone
    assert records[3]["reward/mean"] == 0.33
    assert records[5]["reward/math/mean"] == pytest.approx(0.5)  # training and eval line merged
    assert records[5]["eval/humaneval/avg@4"] == pytest.approx(0.1 + 0.09)
    assert records[10]["eval/arithmetic_heldout/pass@16"] == pytest.approx(0.33)
    assert math.isnan(records[11]["reward/mean"]) and records[11]["learner/loss"] == math.inf
    assert series(records, "eval/arithmetic_heldout/avg@4")[0] == [0, 5, 10]
    steps, _ = series(records, "reward/mean")
    assert steps == list(range(1, 11))  # step 11's nan is not drawn
    assert series(records, "reward/code/mean")[0] == [7, 8, 9, 10]


def test_plot_run_writes_png(tmp_path):
    run_dir = tmp_path / "run_a"
    _write_messy_run(run_dir)
    out = plot_run(run_dir)
    assert out == run_dir / "plot.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_no_eval_run_and_out_option(tmp_path, capsys):
    run_dir = tmp_path / "run_b"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps(_train_line(s)) for s in range(1, 4)) + "\n")
    out = tmp_path / "elsewhere.png"
    assert main([str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("setup, expected", [
    (lambda d: None, "run directory"),
    (lambda d: d.mkdir(), "metrics.jsonl not found"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"no_step": 1}\n{"step": 2, "tr')),
     "no parseable lines"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, setup, expected):
    run_dir = tmp_path / "run_c"
    setup(run_dir)
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("srpo_ray.plot: error: ") and expected in err and str(run_dir) in err
    assert "\n" not in err


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    _write_messy_run(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_try_plot_run_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="srpo_ray.plot"):
        assert try_plot_run(tmp_path / "missing") is None
    assert "no plot of" in caplog.text
    _write_messy_run(tmp_path)
    assert try_plot_run(tmp_path) == tmp_path / "plot.png"


def test_module_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "srpo_ray.plot", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("srpo_ray.plot: error: ")


def test_out_in_missing_directory_is_a_user_error(tmp_path, capsys):
    _write_messy_run(tmp_path)
    assert main([str(tmp_path), "--out", str(tmp_path / "no_such_dir" / "p.png")]) == 2
    assert "no_such_dir does not exist" in capsys.readouterr().err
