"""Evaluation on the real roles: `python -m srpo_ray.eval` with vLLM and the reward
workers on the scripted tiny model (tests/scripted_model.py: it answers \\boxed{7} at a
low temperature, \\boxed{7} or \\boxed{3} at temperature 1), so every score is known;
and its errors. (A training run that evaluates every step ends exactly where the same
run without evaluation does: test_integration.py, on its run.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_run import write_eval_data

from srpo_ray.eval.__main__ import main as eval_main

pytestmark = pytest.mark.slow
P_SEVEN = 1 / (1 + 2.718281828459045 ** -0.5)  # the scripted model's p(7) at temperature 1


def cli(model: str, data: str, out: Path, *overrides: str) -> int:
    from local_ray import ensure_local_ray
    ensure_local_ray()
    return eval_main(["--config", "configs/tiny_test.yaml", "--model", model, "--data", data,
                      "--out", str(out), *overrides])


def checkpoint_of(model_dir: str, folder: Path, *overrides: str) -> Path:
    """A checkpoint folder as training leaves it, as far as evaluation reads it: hf/ (the
    model) and config.yaml (the run's config, here tiny_test.yaml + `overrides`)."""
    from srpo_ray.config.load import load_config, to_yaml
    folder.mkdir(parents=True)
    (folder / "hf").symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    (folder / "config.yaml").write_text(to_yaml(load_config("configs/tiny_test.yaml", [f"model.path={model_dir}",
                                                                                     *overrides])))
    return folder


def test_eval_command_scores_a_model_whose_answers_are_known(scripted_model_dir, tmp_path, capsys):
    data = write_eval_data(tmp_path / "heldout.parquet")
    # a checkpoint evaluates with its own config (eval.k=4 and the temperature are the run's) ...
    ckpt = checkpoint_of(scripted_model_dir, tmp_path / "run" / "checkpoints" / "step_000002",
                         "eval.k=4", "eval.temperature=0.02", "eval.pass_at=[1,4]")
    from local_ray import ensure_local_ray
    ensure_local_ray()
    assert eval_main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "cold"),
                      "eval.greedy=true"]) == 0  # ... which overrides change
    out = capsys.readouterr().out
    assert f"srpo_ray.eval: config {ckpt / 'config.yaml'} (the checkpoint's own" in out and "| mixed |" in out
    result = json.loads((tmp_path / "cold" / "results.json").read_text())
    assert result["config"] == str(ckpt / "config.yaml") and result["model"] == str(ckpt / "hf")
    assert result["scores"]["sevens"] == {**result["scores"]["sevens"], "avg@4": 1.0, "pass@1": 1.0,
                                          "pass@4": 1.0, "maj@4": 1.0, "greedy": 1.0, "answered_frac": 1.0}
    assert result["scores"]["mixed"]["avg@4"] == 0.5 and result["scores"]["mixed"]["maj@4"] == 0.5
    assert result["scores"]["all"]["avg@4"] == 0.75 and result["k"] == 4
    assert all(text.startswith("\\boxed{7}") for p in result["problems"] for text in p["texts"])
    assert "| sevens |" in (tmp_path / "cold" / "results.md").read_text()

    # at temperature 1 the answer is 7 with probability P_SEVEN: avg@64 estimates it
    assert cli(scripted_model_dir, str(data), tmp_path / "warm", "eval.k=64", "eval.temperature=1.0",
               "eval.top_p=1.0", "eval.greedy=false", "eval.pass_at=[1,2,64]") == 0
    warm = json.loads((tmp_path / "warm" / "results.json").read_text())["scores"]["sevens"]
    assert abs(warm["avg@64"] - P_SEVEN) < 4 * (P_SEVEN * (1 - P_SEVEN) / 128) ** 0.5
    assert warm["pass@1"] == pytest.approx(warm["avg@64"]) and warm["pass@64"] == 1.0
    assert warm["pass@1"] < warm["pass@2"] < warm["pass@64"] and "greedy" not in warm


@pytest.mark.parametrize("model, data, override, message", [
    ("/nonexistent/model", "builtin:code_heldout", None, "/nonexistent/model"),
    (None, "builtin:no_such_set", None, "unknown builtin dataset 'no_such_set'"),
    (None, "NOT_VERL", None, "missing column"),
    (None, "builtin:code_heldout", "eval.k=0", "eval.k"),
])
def test_eval_command_errors_name_the_input(scripted_model_dir, tmp_path, capsys, model, data, override, message):
    if data == "NOT_VERL":
        import pyarrow as pa
        import pyarrow.parquet as pq
        data = str(tmp_path / "other.parquet")
        pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), data)
    code = cli(model or scripted_model_dir, data, tmp_path / "out", *([override] if override else []))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("srpo_ray.eval: error:") and message in err, err
