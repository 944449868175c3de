"""Preemption: a stop requested mid-run (SIGTERM in the driver) ends the loop at the next
safe point with a checkpoint, and --resume repeats the uninterrupted run. The trainer
with fake roles (test_trainer.py), the SIGTERM / grace-period logic without signals,
and the handlers with real signals. A real driver run: tests/ray/test_preemption_run.py."""
import os
import signal
import time

import pytest
import torch
from test_trainer import make_trainer, read_metrics

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.loop.stop import Preemption, PreemptionAbort, StopRequest, preemption_signals
from srpo_ray.loop.trainer import STATE_FILE

OFF = ("rollout.one_step_off=true", "rollout.max_staleness=1", "stages.0.until_epochs=2")
COMPARED = ("stage", "epoch", "pool/size", "pool/removed", "policy/version", "reward/mean",
            "rollout/staleness_max")


def stop_during_step(trainer, k):
    """Ask `trainer` to stop while step k trains (its update runs in the loop's thread)."""
    update = trainer.update

    def update_then_stop(rollouts, started):
        if trainer.step == k:
            trainer.stop_request.request("test")
        return update(rollouts, started)

    trainer.update = update_then_stop


def saved_state(path):
    state = torch.load(path / STATE_FILE, weights_only=False)
    return str(state["ledger"]), state["stages"], state["step"], state["version"]


def record_checkpoints(trainer):
    """Each checkpoint's trainer state, by step (the fakes' CheckpointManager keeps two)."""
    states, save = {}, trainer.save

    def save_and_record():
        path = save()
        states[trainer.step] = saved_state(path)
        return path

    trainer.save = save_and_record
    return states


def assert_same_run(full_dir, part_dir, steps):
    full_rows, part_rows = read_metrics(full_dir), read_metrics(part_dir)
    assert [r["step"] for r in part_rows] == list(range(1, steps + 1))
    for a, b in zip(full_rows, part_rows, strict=True):
        for key in COMPARED:
            assert a.get(key) == b.get(key), (a["step"], key)


def test_a_stop_during_step_k_checkpoints_k_and_resume_repeats_the_uninterrupted_run(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, _ = make_trainer(full_dir, "trainer.save_every=1")
    full_states = record_checkpoints(full)
    full.fit()
    part, _ = make_trainer(part_dir)  # save_every=0: only the stop saves before the end
    stop_during_step(part, 3)
    part.fit()
    assert part.stopped and part.step == 3
    assert part.checkpoints.latest().name == "step_000003"
    assert [r["step"] for r in read_metrics(part_dir)] == [1, 2, 3]
    assert saved_state(part.checkpoints.latest()) == full_states[3]

    resumed, _ = make_trainer(part_dir)
    assert resumed.resume() is not None and resumed.step == 3
    resumed.fit()
    assert not resumed.stopped and resumed.step == 8
    assert_same_run(full_dir, part_dir, 8)
    assert saved_state(resumed.checkpoints.latest()) == full_states[8]


def test_a_step_collected_ahead_is_trained_before_the_stop_checkpoint(tmp_path):
    """rollout.one_step_off: when the stop comes in step 3, step 4 is being collected
    already (its outcomes are in the ledger), so step 4 trains, nothing is collected
    ahead of it, and the checkpoint is step 4's: the one save_every=4 writes."""
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, _ = make_trainer(full_dir, *OFF, "trainer.save_every=4")
    full_states = record_checkpoints(full)
    full.fit()
    part, _ = make_trainer(part_dir, *OFF)
    stop_during_step(part, 3)
    part.fit()
    assert part.stopped and part.step == 4
    assert part.checkpoints.latest().name == "step_000004"
    assert saved_state(part.checkpoints.latest()) == full_states[4]

    resumed, _ = make_trainer(part_dir, *OFF)
    assert resumed.resume() is not None and resumed.step == 4
    resumed.fit()
    assert_same_run(full_dir, part_dir, 8)
    assert saved_state(resumed.checkpoints.latest()) == full_states[8]


def test_a_run_without_a_stop_request_is_not_stopped(tmp_path):
    trainer, _ = make_trainer(tmp_path, "trainer.total_steps=2")
    trainer.fit()
    assert not trainer.stopped and trainer.step == 2


# ---- SIGTERM and the grace period, without signals --------------------------------------
def test_the_first_sigterm_asks_for_a_stop_and_starts_the_grace_period():
    armed, said = [], []
    stop = StopRequest()
    preemption = Preemption(stop, 42.0, arm_deadline=armed.append, say=said.append)
    preemption.on_sigterm()
    assert stop.requested and stop.reason == "SIGTERM"
    assert armed == [42.0]
    assert len(said) == 1 and "checkpoint" in said[0] and "trainer.preempt_grace_s=42" in said[0]


def test_a_second_sigterm_gives_the_checkpoint_up():
    preemption = Preemption(StopRequest(), 42.0, arm_deadline=lambda s: None, say=lambda line: None)
    preemption.on_sigterm()
    with pytest.raises(PreemptionAbort, match="second SIGTERM"):
        preemption.on_sigterm()


def test_the_end_of_the_grace_period_gives_the_checkpoint_up():
    preemption = Preemption(StopRequest(), 42.0, arm_deadline=lambda s: None, say=lambda line: None)
    with pytest.raises(PreemptionAbort, match="trainer.preempt_grace_s=42"):
        preemption.on_deadline()


def test_the_grace_period_must_be_positive():
    with pytest.raises(ConfigError, match="trainer.preempt_grace_s"):
        load_config(None, ["trainer.preempt_grace_s=0"])


# ---- the handlers, with real signals ----------------------------------------------------
def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_sigterm_sets_the_flag_and_the_handlers_are_restored_after():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    stop = StopRequest()
    with preemption_signals(stop, grace_s=60):
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.requested)
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the grace period runs
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)) == before
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_the_grace_period_raises_in_the_main_thread():
    stop = StopRequest()
    with pytest.raises(PreemptionAbort, match="grace period"):
        with preemption_signals(stop, grace_s=0.05):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the alarm
