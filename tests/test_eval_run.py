"""Evaluation on the real roles: `python -m srpo_ray.eval` with vLLM and the reward
workers on the scripted tiny model (tests/scripted_model.py: it answers \\boxed{7} at a
low temperature, \\boxed{7} or \\boxed{3} at temperature 1), so every score is known;
its errors; and a training run that evaluates every step ending exactly where the same
run without evaluation ends (test_integration.py's run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_run import driver_run, metrics
from srpo_ray.data import write_verl_parquet
from srpo_ray.eval.__main__ import main as eval_main

pytestmark = pytest.mark.slow
P_SEVEN = 1 / (1 + 2.718281828459045 ** -0.5)  # the scripted model's p(7) at temperature 1


def write_eval_data(path: Path) -> Path:
    """Two sources: `sevens` (answer 7: always right at a low temperature) and `mixed`
    (one problem answered 7, one answered 3)."""
    rows = [{"data_source": source, "ability": "math",
             "prompt": [{"role": "user", "content": f"Held-out question {i} ({source})?"}],
             "reward_model": {"ground_truth": truth}, "extra_info": {"id": f"{source}-{i}"}}
            for source, truths in (("sevens", ["7", "7"]), ("mixed", ["7", "3"])) for i, truth in enumerate(truths)]
    write_verl_parquet(rows, path)
    return path


def cli(model: str, data: str, out: Path, *overrides: str) -> int:
    from conftest import ensure_local_ray
    ensure_local_ray()
    return eval_main(["--config", "configs/tiny_test.yaml", "--model", model, "--data", data,
                      "--out", str(out), *overrides])


def test_eval_command_scores_a_model_whose_answers_are_known(scripted_model_dir, tmp_path, capsys):
    data = write_eval_data(tmp_path / "heldout.parquet")
    assert cli(scripted_model_dir, str(data), tmp_path / "cold", "eval.k=4", "eval.temperature=0.02") == 0
    result = json.loads((tmp_path / "cold" / "results.json").read_text())
    assert result["scores"]["sevens"] == {**result["scores"]["sevens"], "avg@4": 1.0, "pass@1": 1.0,
                                          "pass@4": 1.0, "maj@4": 1.0, "greedy": 1.0, "answered_frac": 1.0}
    assert result["scores"]["mixed"]["avg@4"] == 0.5 and result["scores"]["mixed"]["maj@4"] == 0.5
    assert result["scores"]["all"]["avg@4"] == 0.75 and result["k"] == 4
    assert all(text.startswith("\\boxed{7}") for p in result["problems"] for text in p["texts"])
    assert "| sevens |" in (tmp_path / "cold" / "results.md").read_text()
    assert "| mixed |" in capsys.readouterr().out

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


def test_evaluating_every_step_leaves_training_unchanged(scripted_model_dir, tmp_path_factory):
    """The same run as test_integration's, with and without evaluation every step: the
    same ledger, stage and final weights; the eval metrics at steps 0-4; eval.json saved."""
    root = tmp_path_factory.mktemp("eval_during_training")
    eval_data = write_eval_data(root / "heldout.parquet")
    common = ("trainer.total_steps=4",)
    _, plain = driver_run(scripted_model_dir, root, "plain", *common)
    _, evaluated = driver_run(scripted_model_dir, root, "evaluated", *common, f"eval.files=[{eval_data}]",
                              "eval.every_steps=1", "eval.k=4", "eval.temperature=0.02")
    final = Path("checkpoints") / "step_000004"
    state = lambda run: torch.load(run / final / "trainer_state.pt", weights_only=False)  # noqa: E731
    assert str(state(plain)["ledger"]) == str(state(evaluated)["ledger"])
    assert state(plain)["stages"] == state(evaluated)["stages"] and state(evaluated)["version"] >= 1
    weights = lambda run: load_file(str(run / final / "hf" / "model.safetensors"))  # noqa: E731
    plain_w, eval_w = weights(plain), weights(evaluated)
    assert plain_w.keys() == eval_w.keys()
    for name in plain_w:
        torch.testing.assert_close(plain_w[name], eval_w[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")

    rows = metrics(evaluated)
    evals = [r for r in rows if "eval/sevens/avg@4" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4]
    assert evals[0]["eval/sevens/avg@4"] == 1.0 and evals[0]["eval/mixed/avg@4"] == 0.5
    train_keys = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))}  # noqa: E731
    assert [train_keys(r) for r in metrics(plain)] == [train_keys(r) for r in rows if r not in evals]
    saved = json.loads((evaluated / final / "eval.json").read_text())
    assert saved["step"] == 4 and saved["policy_version"] == state(evaluated)["version"]
    summary = (evaluated / "eval" / "summary.md").read_text()  # the driver's before/after table
    assert "| sevens | avg@4 | 1.000 |" in summary and "step 0" in summary and "step 4" in summary
