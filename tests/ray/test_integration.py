"""The real loop end to end on a local Ray: vLLM generation, sandboxed rewards, a
2-rank FSDP2 learner, History Resampling, the stage switch, checkpoints and resume.

The policy is a scripted tiny model (tests/scripted_model.py) so outcomes are known:
it answers \\boxed{7} or \\boxed{3}; at the stage-1 temperature (0.02) always 7.
Math prompts whose answer is 7 are therefore all-correct in stage 1 and must leave the
pool at the epoch's end; those whose answer is 3 are all-wrong and must stay. Stage 2
samples at temperature 1, so groups are mixed, the learner updates and the weights
must reach the generator (rollout log-probs equal the learner's)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_run import assert_sampled_with, driver_run, metrics, rollouts, write_eval_data
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(scripted_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    data, run_dir = driver_run(scripted_model_dir, root, "full", "trainer.total_steps=4")
    return root, data, run_dir


def test_stage_one_resampling_drops_all_correct_prompts(full_run):
    _, _, run_dir = full_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert rows[0]["correct/math/mean"] in (0.0, 0.5, 1.0)  # 7s all right, 3s all wrong
    for row in rows:  # per data source too (one source per domain here, so they agree)
        assert row["reward/source/test/arith/mean"] == row["reward/math/mean"]
        assert row["correct/source/test/arith/mean"] == row["correct/math/mean"]
        assert "correct/source/test/code/mean" not in row or row["stage"] == 1
    assert any("correct/source/test/code/mean" in row for row in rows[2:])  # code joins in stage 2
    assert rows[0]["groups/zero_variance_frac"] == 1.0 and rows[0]["policy/version"] == 0
    assert rows[2]["epoch/dropped"] == 4 and rows[2]["pool/removed"] == 4
    assert rows[2]["pool/size"] == 4 + 2  # the 3s stay (all wrong), code joins in stage 2
    state = torch.load(run_dir / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert state["stages"] and state["step"] == 4


def test_stage_two_learns_and_weights_reach_the_generator(full_run, scripted_model_dir):
    _, _, run_dir = full_run
    rows = metrics(run_dir)
    assert "learner/loss" in rows[2] and rows[2]["policy/version"] == 1, "stage 2's mixed groups must train"
    # Step 4 sampled with version 1, the weights right after step 3's update (checkpoint 3).
    # vLLM's log-probs of those samples must be the learner's version-1 log-probs, and not
    # the initial model's: only true if the new weights reached the generator.
    step4 = rollouts(run_dir, 4)
    assert step4 and all(g["policy_version"] == 1 for g in step4)
    assert_sampled_with(step4, run_dir / "checkpoints" / "step_000003" / "hf", not_with=scripted_model_dir)


def test_final_checkpoint_loads_in_transformers(full_run):
    from transformers import AutoModelForCausalLM

    _, _, run_dir = full_run
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / latest / "hf")
    assert model.config.hidden_size == 64


def test_evaluating_every_step_and_resuming_leave_training_unchanged(full_run, scripted_model_dir):
    """The same run with evaluation every step, stopped after step 2 and resumed across
    the epoch's end and the stage switch: the same ledger (at step 2 and at the end),
    stages, final weights and training metrics as the uninterrupted run without
    evaluation; the eval metrics at steps 0-4 (none repeated at the resume); eval.json
    saved; the summary written. (One run for both properties: each driver run costs a
    minute on two cores; tests/unit/test_eval.py and test_trainer.py check each alone.)"""
    root, _, plain = full_run
    eval_data = write_eval_data(root / "heldout.parquet")
    evaluating = (f"eval.files=[{eval_data}]", "eval.every_steps=1", "eval.k=4", "eval.temperature=0.02")
    _, evaluated = driver_run(scripted_model_dir, root, "evaluated", "trainer.total_steps=2", *evaluating)
    state_at = lambda run, step: torch.load(run / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt",  # noqa: E731
                                            weights_only=False)
    assert str(state_at(plain, 2)["ledger"]) == str(state_at(evaluated, 2)["ledger"])
    driver_run(scripted_model_dir, root, "evaluated", "trainer.total_steps=4", *evaluating, "--resume")

    final = Path("checkpoints") / "step_000004"
    state = lambda run: state_at(run, 4)  # noqa: E731
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
    # --resume pushes the weights once more, which step 3's weight_sync/ metrics count
    train_keys = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "eval/", "weight_sync/"))}  # noqa: E731
    assert [r["step"] for r in rows if r not in evals] == [1, 2, 3, 4]
    assert [train_keys(r) for r in metrics(plain)] == [train_keys(r) for r in rows if r not in evals]
    saved = json.loads((evaluated / final / "eval.json").read_text())
    assert saved["step"] == 4 and saved["policy_version"] == state(evaluated)["version"]
    summary = (evaluated / "eval" / "summary.md").read_text()  # the driver's before/after table
    assert "| sevens | avg@4 | 1.000 |" in summary and "step 0" in summary and "step 4" in summary
