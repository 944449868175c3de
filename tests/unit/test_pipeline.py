"""One-step-off-policy pipelining (rollout.one_step_off): RolloutPipeline on its own,
and the training loop with fake roles. A real run (vLLM, FSDP, Ray) in this mode is in
test_one_step_off.py."""
import json
import threading
import time

import pytest
from test_trainer import make_trainer, read_metrics

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.loop.pipeline import RolloutPipeline


# ---- the pipeline alone ----------------------------------------------------------------
def test_without_lookahead_each_step_is_collected_when_taken():
    calls = []
    pipe = RolloutPipeline(lambda step: calls.append(step) or f"r{step}", lookahead=False,
                           may_prefetch=lambda step: True)
    assert pipe.take(1) == "r1" and calls == [1]
    pipe.settle()
    assert pipe.take(2) == "r2" and calls == [1, 2] and not pipe.collecting_ahead


def test_lookahead_collects_the_next_step_in_the_background():
    started, release = threading.Event(), threading.Event()

    def collect(step):
        if step == 2:
            started.set()
            assert release.wait(10)
        return f"r{step}"

    pipe = RolloutPipeline(collect, lookahead=True, may_prefetch=lambda step: step <= 3)
    assert pipe.take(1) == "r1"
    assert started.wait(10), "step 2 was not collected while step 1 was handed out"
    assert pipe.collecting_ahead
    release.set()
    pipe.settle()
    assert pipe.take(2) == "r2" and pipe.collecting_ahead  # step 3 is on its way
    assert pipe.take(3) == "r3" and not pipe.collecting_ahead  # vetoed: no step 4


def test_a_failed_collection_raises_in_the_trainers_thread():
    def collect(step):
        if step == 2:
            raise ValueError("reward worker exploded")
        return step

    pipe = RolloutPipeline(collect, lookahead=True, may_prefetch=lambda step: True)
    assert pipe.take(1) == 1
    with pytest.raises(ValueError, match="exploded"):
        pipe.settle()


def test_taking_another_step_than_the_one_collected_ahead_is_an_error():
    pipe = RolloutPipeline(lambda step: step, lookahead=True, may_prefetch=lambda step: True)
    pipe.take(1)
    with pytest.raises(RuntimeError, match="collected ahead for step 2"):
        pipe.take(5)


# ---- the training loop with fake roles -------------------------------------------------
OFF = ("rollout.one_step_off=true", "rollout.max_staleness=1", "stages.0.until_epochs=2")


def test_one_step_off_needs_a_staleness_bound(tmp_path):
    with pytest.raises(ConfigError, match="rollout.one_step_off.*max_staleness"):
        load_config(None, ["rollout.one_step_off=true"])


def test_next_step_generates_while_this_step_trains(tmp_path):
    trainer, roles = make_trainer(tmp_path, *OFF, "trainer.total_steps=3")
    generate, train = roles.rollout.generate, roles.learner.train
    started = [threading.Event() for _ in range(4)]  # started[i]: generate call i began
    calls = {"generate": 0, "train": 0}
    overlapped = []

    def generate_and_signal(prompts, sampling):
        calls["generate"] += 1
        started[calls["generate"] - 1].set()
        return generate(prompts, sampling)

    def train_while_generating(batch, temperature):
        calls["train"] += 1
        # step k's training waits for step k+1's generation to begin: with the pipeline
        # it already runs; without, it would start only after this returns
        if calls["train"] < 3:  # step 3 is the last: nothing to collect ahead
            overlapped.append(started[calls["train"]].wait(10))
        return train(batch, temperature)

    roles.rollout.generate, roles.learner.train = generate_and_signal, train_while_generating
    trainer.fit()
    assert overlapped == [True, True]  # steps 1 and 2 overlapped steps 2 and 3's generation


def test_rollouts_are_one_version_old_and_recorded_so(tmp_path):
    trainer, roles = make_trainer(tmp_path, *OFF, "trainer.total_steps=6", "metrics.rollouts_per_step=1")
    trainer.fit()
    rows = read_metrics(tmp_path)
    trained = [r for r in rows if "train/loss" in r]
    assert len(trained) >= 4
    # step 1 samples version 0 and trains it to 1; every later step samples the weights
    # its predecessor started from, one version behind the learner that trains on them
    assert rows[0]["rollout/staleness_max"] == 0
    assert all(r["rollout/staleness_max"] == 1 for r in rows[1:])
    dumped = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [d["staleness"] for d in dumped] == [0] + [1] * (len(rows) - 1)
    assert [v for _, v in roles.rollout.pushes] == list(range(1, len(trained) + 1))


def test_history_resampling_and_stages_match_the_on_policy_loop(tmp_path):
    """The ledger and the stage schedule see the same prompts and rewards in the same
    order with or without pipelining (the fakes' rewards do not depend on weights)."""
    on, _ = make_trainer(tmp_path / "on", "rollout.max_staleness=1", "stages.0.until_epochs=2")
    off, _ = make_trainer(tmp_path / "off", *OFF)
    on.fit()
    off.fit()
    for a, b in zip(read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off"), strict=True):
        for key in ("stage", "epoch", "pool/size", "pool/removed", "reward/mean", "groups/count"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert on.ledger.state_dict().keys() == off.ledger.state_dict().keys()
    assert on.stages.state_dict() == off.stages.state_dict()


def test_no_collection_runs_ahead_of_a_checkpoint_so_resume_is_exact(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, _ = make_trainer(full_dir, *OFF, "trainer.save_every=2")
    full.fit()
    part, _ = make_trainer(part_dir, *OFF, "trainer.save_every=2", "trainer.total_steps=4")
    part.fit()
    resumed, _ = make_trainer(part_dir, *OFF, "trainer.save_every=2")
    assert resumed.resume() is not None and resumed.step == 4
    resumed.fit()
    full_rows, part_rows = read_metrics(full_dir), read_metrics(part_dir)
    assert [r["step"] for r in part_rows] == list(range(1, 9))
    for a, b in zip(full_rows, part_rows):
        for key in ("stage", "epoch", "pool/size", "policy/version", "reward/mean", "rollout/staleness_max"):
            assert a.get(key) == b.get(key), (a["step"], key)
    # a step after a save samples the latest weights: nothing was collected ahead of it
    assert [r["rollout/staleness_max"] for r in full_rows] == [0, 1, 0, 1, 0, 1, 0, 1]


def test_a_generation_failure_ahead_stops_the_run_with_its_error(tmp_path):
    trainer, roles = make_trainer(tmp_path, *OFF, "trainer.total_steps=4")
    generate = roles.rollout.generate
    calls = []

    def failing(prompts, sampling):
        calls.append(sampling.seed)
        if len(calls) == 3:
            raise RuntimeError("generation worker 0 died and could not be replaced")
        return generate(prompts, sampling)

    roles.rollout.generate = failing
    with pytest.raises(RuntimeError, match="could not be replaced"):
        trainer.fit()
    assert trainer.step == 2  # the failure surfaced before step 2's weights were pushed


def test_close_waits_for_the_collection_ahead_and_drops_it():
    release = threading.Event()

    def collect(step):
        if step == 2:
            assert release.wait(10)
            raise RuntimeError("the run is over anyway")
        return step

    pipe = RolloutPipeline(collect, lookahead=True, may_prefetch=lambda step: True)
    pipe.take(1)
    threading.Timer(0.2, release.set).start()
    pipe.close()  # returns once step 2's collection ended; its error is dropped
    assert not pipe.collecting_ahead
    assert not [t for t in threading.enumerate() if t.name.startswith("collect-step-")]


def test_a_learner_failure_leaves_no_collection_running(tmp_path):
    trainer, roles = make_trainer(tmp_path, *OFF, "trainer.total_steps=4")
    train = roles.learner.train

    def failing(batch, temperature):
        if len(roles.learner.batches) == 1:
            raise RuntimeError("learner rank 1 died during train_step")
        return train(batch, temperature)

    generate = roles.rollout.generate

    def slow_generate(prompts, sampling):
        time.sleep(0.5)  # step 3's collection is still running when step 2's training fails
        return generate(prompts, sampling)

    roles.learner.train, roles.rollout.generate = failing, slow_generate
    with pytest.raises(RuntimeError, match="died during train_step"):
        trainer.fit()
    assert not [t for t in threading.enumerate() if t.name.startswith("collect-step-")]
