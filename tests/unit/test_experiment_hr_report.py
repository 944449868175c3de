"""bench/experiment_hr_report.py on hand-made runs: the outcomes it tabulates and the
plan's reading rule (ranges apart vs within seed spread)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import experiment_hr_report as report  # noqa: E402


def _steps(zero_variance: list[float], pool: list[int]) -> list[dict]:
    return [{"step": i + 1, "epoch": 1 + i // 2, "groups/count": 8, "groups/zero_variance_frac": z,
             "groups/all_correct_frac": z / 2, "groups/all_wrong_frac": z / 2, "pool/size": p}
            for i, (z, p) in enumerate(zip(zero_variance, pool))]


def _write(metrics: Path, name: str, rows: list[dict], scores: dict[int, float]) -> None:
    (metrics / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = {"k": 4, "steps": {str(s): {report.MATH: {"avg@4": v}} for s, v in scores.items()},
             "examples": {str(max(scores)): {report.MATH: ["2 + 2 = \\boxed{4}"]}}}
    (metrics / f"{name}.evals.json").write_text(json.dumps(evals))


def test_verdict_follows_the_reading_rule() -> None:
    assert report.verdict((0.5, 0.45, 0.55), (0.3, 0.25, 0.35), True) == "higher, ranges apart (better)"
    assert report.verdict((0.5, 0.45, 0.55), (0.3, 0.25, 0.35), False) == "higher, ranges apart (worse)"
    assert report.verdict((0.3, 0.25, 0.35), (0.5, 0.45, 0.55), False) == "lower, ranges apart (better)"
    assert report.verdict((0.5, 0.3, 0.55), (0.4, 0.35, 0.45), True) == "within seed spread"
    assert report.verdict(None, (0.4, 0.35, 0.45), True) == "not run yet"


def test_report_tabulates_outcomes_per_arm(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "base.evals.json").write_text(json.dumps({"k": 4, "steps": {"0": {report.MATH: {"avg@4": 0.2}}},
                                                         "examples": {}}))
    # GRPO: zero variance 0.5 then 0.75 in the second half; HR: 0.5 then 0.25, pool shrinking.
    _write(metrics, "grpo.s1", _steps([0.5, 0.5, 0.75, 0.75], [32] * 4), {4: 0.30})
    _write(metrics, "grpo.s2", _steps([0.5, 0.5, 0.75, 0.75], [32] * 4), {4: 0.32})
    _write(metrics, "hr.s1", _steps([0.5, 0.5, 0.25, 0.25], [32, 32, 28, 28]), {4: 0.40})
    _write(metrics, "hr.s2", _steps([0.5, 0.5, 0.25, 0.25], [32, 32, 26, 26]), {4: 0.44})
    seconds = {"grpo.s1": 100.0, "grpo.s2": 110.0, "hr.s1": 90.0, "hr.s2": 95.0}
    report.write_report(tmp_path, seconds, "test scale")

    text = (tmp_path / "results.md").read_text()
    assert "Initial model, held-out math avg@4: 0.20." in text
    grpo = next(line for line in text.splitlines() if line.startswith(f"| {report.LABELS['grpo']} |"))
    hr = next(line for line in text.splitlines() if line.startswith(f"| {report.LABELS['hr']} |"))
    # held-out mean (range), zero variance over the second half, pool at the end
    assert "| 0.31 (0.30-0.32) | 0.75 |" in grpo and "| 0.42 (0.40-0.44) | 0.25 |" in hr
    assert "| 27.00 (26.00-28.00) |" in hr
    # 4 steps x 8 groups x 4 samples; (0.42 - 0.2) gain over 128 samples -> per 1k
    assert "| 128.00 |" in hr and f"| {1000 * 0.22 / 128:.2f} (" in hr
    reading = next(line for line in text.splitlines() if line.startswith("| hr vs grpo |"))
    assert reading == "| hr vs grpo | higher, ranges apart (better) | lower, ranges apart (better) |"
    assert report.verdict((0.5, 0.5, 0.5), (0.3, 0.3, 0.3), True, seeds=1) == "0.50 vs 0.30: one seed, no reading yet"
    assert "| hr vs dapo | not run yet | not run yet |" in text
    assert "2 + 2 = \\\\boxed{4}" in text  # the policies' texts, JSON-quoted
    assert (tmp_path / "experiment_hr.png").stat().st_size > 0


def test_per_epoch_pool_is_the_epochs_last_value() -> None:
    rows = _steps([0.5, 0.5, 0.25, 0.25], [32, 30, 28, 27])
    assert report.per_epoch(rows, "pool/size") == {1: 30, 2: 27}
    assert report.per_epoch(rows, "groups/all_correct_frac") == {1: pytest.approx(0.25), 2: pytest.approx(0.125)}


def _prepass(path: Path, rates: list[float]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"wide-{i}" for i in range(len(rates))]
    pq.write_table(pa.table({"prompt_id": ids, "data_source": ["builtin/arithmetic_wide"] * len(rates),
                             "k": [16] * len(rates), "correct": [int(r * 16) for r in rates],
                             "pass_rate": rates}), path)
    return path


def test_filtered_pool_ends_at_the_pool_th_problem_in_band(tmp_path: Path) -> None:
    import experiment_hr

    prepass = _prepass(tmp_path / "p.parquet", [0.0, 0.5, 1.0, 0.0625, 0.0, 0.9375, 0.25])
    assert experiment_hr.filtered_count(prepass, 3) == 6  # wide-1, wide-3, wide-5
    with pytest.raises(SystemExit, match="4 in \\(0, 1\\), 5 needed"):
        experiment_hr.filtered_count(prepass, 5)


def test_every_arm_is_a_valid_config(tmp_path: Path) -> None:
    """Each arm's overrides load (a wrong key would stop a 20-minute run at its start),
    and the arms differ where the plan says they do."""
    import experiment_hr

    from srpo_ray.config.load import load_config

    prepass = _prepass(tmp_path / "p.parquet", [0.5] * 40)
    pools = experiment_hr.write_pools(prepass, 32, tmp_path)
    configs = {arm: load_config(None, experiment_hr.overrides_for(arm, pools, prepass, tmp_path / arm,
                                                                  "builtin:smollm2-135m-instruct", 1, 8))
               for arm in experiment_hr.ARMS}
    assert not configs["grpo"].resample.enabled and configs["hr"].resample.enabled
    assert configs["dapo"].algo.dynamic_sampling and not configs["dapo"].resample.enabled
    assert configs["hr_seeded_unfiltered"].resample.seed_from == str(prepass)
    assert configs["hr"].data.pass_rate_band == [0.01, 0.99] and not configs["hr_unfiltered"].data.pass_rates
    assert [s.domains for s in configs["two_stage"].stages] == [["math"], ["math", "code"]]
    assert [s.domains for s in configs["mixed"].stages] == [["math", "code"]]
    assert [s.domains for s in configs["hr"].stages] == [["math"]] and len(configs["hr"].data.train_files) == 1
    for cfg in configs.values():
        assert (cfg.trainer.total_steps, cfg.trainer.prompts_per_step, cfg.rollout.n) == (24, 8, 4)
        assert cfg.eval.every_steps == 8 and cfg.eval.max_problems_per_source == 100
        assert cfg.eval.files[0] == "builtin:arithmetic_wide_heldout"


def test_curriculum_arms_train_on_the_filtered_problems_without_a_pass_rate_key(tmp_path: Path) -> None:
    """Arms C add the 8 programs, which have no pass rate: data.pass_rates would stop the run
    (it needs one per training prompt), so they get the filtered problems already cut."""
    import experiment_hr
    import pyarrow.parquet as pq

    from srpo_ray.config.load import load_config

    prepass = _prepass(tmp_path / "p.parquet", [0.0, 0.5, 1.0, 0.0625, 0.0, 0.9375, 0.25])
    pools = experiment_hr.write_pools(prepass, 3, tmp_path)
    ids = [row["id"] for row in pq.read_table(pools["filtered_precut"][0]).column("extra_info").to_pylist()]
    assert ids == ["wide-1", "wide-3", "wide-5"]  # what data.pass_rate_band keeps of pools["filtered"]
    for arm in ("two_stage", "mixed"):
        cfg = load_config(None, experiment_hr.overrides_for(arm, pools, prepass, tmp_path / arm,
                                                            "builtin:smollm2-135m-instruct", 1, 8))
        assert not cfg.data.pass_rates and cfg.data.train_files == [str(p) for p in pools["filtered_precut"]]
