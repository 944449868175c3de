"""One-step-off-policy pipelining on the real roles: vLLM generation, sandboxed rewards,
a 2-rank FSDP2 learner on a local Ray (rollout.one_step_off=true).

The scripted tiny model (tests/scripted_model.py) makes stage 1 (steps 1-2, nearly
greedy) all zero-variance, so nothing trains before stage 2. With a checkpoint every
2 steps, steps 2 and 4 are collected while steps 1 and 3 train, steps 3 and 5 only
after a checkpoint. So step 4's rollouts come from version 0 (the initial weights) while
the learner that trains on them is at version 1 (staleness 1), and step 5's come from
version 2, the weights of checkpoint 4. The vLLM log-probs in rollouts.jsonl must agree
with those weights: the claimed version is the version that sampled."""
from __future__ import annotations

import pytest
from helpers_run import assert_sampled_with, driver_run, metrics, rollouts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def off_run(scripted_model_dir, tmp_path_factory):
    _, run_dir = driver_run(scripted_model_dir, tmp_path_factory.mktemp("one_step_off"), "run",
                            "trainer.total_steps=5", "trainer.save_every=2", "rollout.one_step_off=true",
                            "rollout.max_staleness=1", "algo.tis_cap=2.0")
    return run_dir


def test_steps_after_a_training_step_train_on_rollouts_one_version_old(off_run):
    rows = metrics(off_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == [0, 0, 1, 1, 1]
    assert "learner/loss" in rows[2] and rows[2]["policy/version"] == 1
    assert rows[3]["rollout/staleness_max"] == 1 and rows[3]["policy/version"] == 2
    assert rows[4]["rollout/staleness_max"] == 0  # collected after checkpoint 4, not ahead
    step4, step5 = rollouts(off_run, 4), rollouts(off_run, 5)
    assert step4 and all(g["policy_version"] == 0 and g["staleness"] == 1 for g in step4)
    assert step5 and all(g["policy_version"] == 2 and g["staleness"] == 0 for g in step5)


def test_rollout_versions_name_the_weights_that_sampled_them(off_run, scripted_model_dir):
    checkpoint_4 = off_run / "checkpoints" / "step_000004" / "hf"
    assert_sampled_with(rollouts(off_run, 4), scripted_model_dir, not_with=checkpoint_4)
    assert_sampled_with(rollouts(off_run, 5), checkpoint_4, not_with=scripted_model_dir)
