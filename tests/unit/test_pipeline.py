"""Asynchronous collection (rollout.steps_ahead: 0 synchronous, 1 one-step-off, k):
RolloutPipeline on its own, and the training loop with fake roles. A real run (vLLM,
FSDP, Ray) with collection ahead is in test_one_step_off.py."""
import json
import threading
import time

import pytest
from test_trainer import make_trainer, read_metrics

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.loop.pipeline import BLOCKED, RolloutPipeline


class Recorder:
    """collect/push for a pipeline alone: what ran, in order, and whether a push ever
    overlapped a collection."""

    def __init__(self, gates=None, fail_at=None):
        self.events, self.gates, self.fail_at = [], gates or {}, fail_at
        self.collecting = False
        self.overlap = False
        self.lock = threading.Lock()

    def collect(self, step):
        with self.lock:
            self.collecting = True
            self.events.append(("collect", step))
        try:
            if step in self.gates:
                assert self.gates[step].wait(10)
            if step == self.fail_at:
                raise ValueError("reward worker exploded")
            return f"r{step}"
        finally:
            self.collecting = False

    def push(self):
        self.overlap |= self.collecting
        self.events.append(("push",))


def pipeline(rec, steps_ahead, last=10, may_start=None):
    return RolloutPipeline(rec.collect, rec.push, steps_ahead,
                           may_start=may_start or (lambda step, done: step <= last), version=0, trained=0)


def run_steps(pipe, steps, hold=False):
    """The trainer's side of `steps` steps, each one learning (a new version)."""
    for step in range(1, steps + 1):
        assert pipe.take(step) == f"r{step}"
        with pipe.training():
            pass
        pipe.trained(step, version=step, hold=hold)
        pipe.done(step)


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- the pipeline alone ----------------------------------------------------------------
def test_synchronous_pushes_before_each_collection():
    rec = Recorder()
    pipe = pipeline(rec, steps_ahead=0, last=3)
    run_steps(pipe, 3)
    pipe.close()
    assert rec.events == [("collect", 1), ("push",), ("collect", 2), ("push",), ("collect", 3), ("push",)]
    assert not rec.overlap


def test_one_step_off_collects_the_next_step_while_this_one_trains():
    rec = Recorder()
    pipe = pipeline(rec, steps_ahead=1, last=3)
    assert pipe.take(1) == "r1"
    wait_for(lambda: ("collect", 2) in rec.events)  # before step 1 has trained
    with pipe.training():
        pass
    pipe.trained(1, version=1)  # waits for step 2's collection, then pushes version 1
    assert rec.events == [("collect", 1), ("collect", 2), ("push",)]
    pipe.done(1)
    assert pipe.take(2) == "r2"
    pipe.close()
    assert not rec.overlap


def test_k_steps_ahead_stops_where_a_step_could_not_train_in_time():
    """The learner never finishes a step: with k = 2 steps 1-3 are admitted (step 3
    trains at version 2 at most, 2 ahead of the weights that sample it), step 4 is not."""
    rec = Recorder()
    pipe = pipeline(rec, steps_ahead=2)
    assert pipe.take(1) == "r1"
    wait_for(lambda: ("collect", 3) in rec.events)
    time.sleep(0.2)
    assert rec.events == [("collect", 1), ("collect", 2), ("collect", 3)]
    pipe.trained(1, version=1)  # the collector is idle: version 1 is pushed at once
    pipe.done(1)
    wait_for(lambda: ("collect", 4) in rec.events)  # step 4 trains at version 3 at most: 2 ahead of 1
    pipe.close()
    assert ("push",) in rec.events[:rec.events.index(("collect", 4))]
    assert not rec.overlap


def test_a_failed_collection_raises_in_the_trainers_thread():
    rec = Recorder(fail_at=2)
    pipe = pipeline(rec, steps_ahead=1)
    assert pipe.take(1) == "r1"
    with pytest.raises(ValueError, match="exploded"):
        pipe.take(2)
    pipe.close()


def test_a_step_may_start_refuses_is_blocked_not_waited_for():
    stop = threading.Event()
    rec = Recorder()
    pipe = pipeline(rec, steps_ahead=0, may_start=lambda step, done: not stop.is_set())
    run_steps(pipe, 1)
    stop.set()
    assert pipe.take(2) in (BLOCKED, "r2")  # the collector may have started step 2 already
    pipe.close()


def test_close_waits_for_the_collection_running_and_drops_it():
    release = threading.Event()
    rec = Recorder(gates={2: release}, fail_at=2)
    pipe = pipeline(rec, steps_ahead=1)
    assert pipe.take(1) == "r1"
    wait_for(lambda: ("collect", 2) in rec.events)
    threading.Timer(0.2, release.set).start()
    pipe.close()  # returns once step 2's collection ended; its error is dropped
    assert not pipe.holds_untrained
    assert not [t for t in threading.enumerate() if t.name == "rollout-collector"]


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
    assert not [t for t in threading.enumerate() if t.name == "rollout-collector"]


# ---- k >= 2 steps ahead ------------------------------------------------------------------
AHEAD_2 = ("rollout.steps_ahead=2", "rollout.max_staleness=2", "stages.0.until_epochs=2")


def instrument(roles, train_seconds=0.0):
    """The fakes record whether a push ever came during a generate call, and the learner
    takes `train_seconds` per step (generation runs ahead while it trains)."""
    state = {"generating": 0, "generated": 0, "push_during_generate": False}
    generate, push, train = roles.rollout.generate, roles.rollout.push_weights, roles.learner.train

    def generating(prompts, sampling):
        state["generating"] += 1
        state["generated"] += 1
        try:
            return generate(prompts, sampling)
        finally:
            state["generating"] -= 1

    def pushing(ref, version):
        state["push_during_generate"] |= state["generating"] > 0
        push(ref, version)

    def slow_train(batch, temperature):
        time.sleep(train_seconds)
        return train(batch, temperature)

    roles.rollout.generate, roles.rollout.push_weights, roles.learner.train = generating, pushing, slow_train
    return state


def test_k_steps_ahead_trains_within_k_versions_and_never_changes_weights_mid_collection(tmp_path):
    trainer, roles = make_trainer(tmp_path, *AHEAD_2, "trainer.total_steps=8")
    state = instrument(roles, train_seconds=0.2)  # the learner is the slow side: generation runs ahead
    trainer.fit()
    rows = read_metrics(tmp_path)
    staleness = [r["rollout/staleness_max"] for r in rows]
    assert max(staleness) == 2 and all(0 <= s <= 2 for s in staleness), staleness
    assert not state["push_during_generate"]
    versions = [v for _, v in roles.rollout.pushes]
    assert versions == sorted(set(versions)) and versions[-1] == trainer.version  # the last one reaches them
    assert all(r["rollout/stale_discarded"] == 0 for r in rows if "rollout/stale_discarded" in r)
    assert all(r["time/generator_idle"] >= 0 and r["time/learner_wait"] >= 0 for r in rows)


@pytest.mark.parametrize("ahead", [OFF, AHEAD_2], ids=["k=1", "k=2"])
def test_history_resampling_and_stages_are_exact_at_any_k(tmp_path, ahead):
    """Every group is recorded in the epoch its prompt was drawn in, before the next draw:
    the ledger and the stages see what the synchronous loop sees (the fakes' rewards do
    not depend on weights)."""
    on, _ = make_trainer(tmp_path / "on", "rollout.max_staleness=2", "stages.0.until_epochs=2")
    off, roles = make_trainer(tmp_path / "off", *ahead)
    instrument(roles, train_seconds=0.05)
    on.fit()
    off.fit()
    for a, b in zip(read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off"), strict=True):
        for key in ("stage", "epoch", "pool/size", "pool/removed", "reward/mean", "groups/count"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert str(on.ledger.state_dict()) == str(off.ledger.state_dict())
    assert on.stages.state_dict() == off.stages.state_dict()


def test_k_steps_ahead_resumes_exactly_from_a_checkpoint(tmp_path):
    """Nothing is collected past a save step before it is saved, so a run stopped at a
    checkpoint and resumed draws, scores and records what the uninterrupted one did."""
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full, roles = make_trainer(full_dir, *AHEAD_2, "trainer.save_every=3", "trainer.total_steps=9")
    instrument(roles, train_seconds=0.05)
    full.fit()
    part, roles = make_trainer(part_dir, *AHEAD_2, "trainer.save_every=3", "trainer.total_steps=6")
    instrument(roles, train_seconds=0.05)
    part.fit()
    resumed, roles = make_trainer(part_dir, *AHEAD_2, "trainer.save_every=3", "trainer.total_steps=9")
    instrument(roles, train_seconds=0.05)
    assert resumed.resume() is not None and resumed.step == 6
    resumed.fit()
    for a, b in zip(read_metrics(full_dir), read_metrics(part_dir), strict=True):
        for key in ("stage", "epoch", "pool/size", "pool/removed", "policy/version", "reward/mean"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert str(full.ledger.state_dict()) == str(resumed.ledger.state_dict())


def test_a_stop_with_k_steps_collected_trains_them_first(tmp_path):
    trainer, roles = make_trainer(tmp_path, *AHEAD_2, "trainer.total_steps=8")
    state = instrument(roles, train_seconds=0.2)
    update = trainer.update

    def update_then_stop(rollouts, started):
        if trainer.step == 3:
            trainer.stop_request.request("test")
        return update(rollouts, started)

    trainer.update = update_then_stop
    trainer.fit()
    assert trainer.stopped and 3 <= trainer.step <= 5  # what was collected when the stop came
    assert state["generated"] == trainer.step  # every step collected was trained, none after
    assert trainer.checkpoints.latest().name == f"step_{trainer.step:06d}"
    resumed, _ = make_trainer(tmp_path, *AHEAD_2, "trainer.total_steps=8")
    assert resumed.resume() is not None and resumed.step == trainer.step
    assert str(resumed.ledger.state_dict()) == str(trainer.ledger.state_dict())


def test_steps_ahead_needs_the_staleness_bound_and_one_spelling():
    with pytest.raises(ConfigError, match="rollout.steps_ahead.*max_staleness >= 2"):
        load_config(None, ["rollout.steps_ahead=2", "rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="rollout.one_step_off.*keep one"):
        load_config(None, ["rollout.one_step_off=true", "rollout.steps_ahead=2", "rollout.max_staleness=2"])
    assert load_config(None, ["rollout.one_step_off=true", "rollout.max_staleness=1"]).rollout.steps_ahead == 1


# ---- partial rollouts ----------------------------------------------------------------------
class PausingGenerators:
    """collect/push/interrupt as a partial-rollout fleet behaves: a collection decodes
    until interrupted, then waits in the pipeline's pause_for_push, then finishes on the
    pushed weights. Records which versions sampled each collection's tokens."""

    def __init__(self):
        self.pipe = None
        self.version = 0  # the generators'
        self.stop_below = 0
        self.events, self.collecting, self.overlap_unpaused = [], False, False
        self.paused = False

    def collect(self, step):
        self.collecting, versions = True, []
        try:
            deadline = time.monotonic() + 10
            while len(versions) < 3 and time.monotonic() < deadline:  # a long response
                if self.version < self.stop_below:
                    self.paused = True
                    self.events.append(("pause", step))
                    self.pipe.pause_for_push()
                    self.paused = False
                    continue
                versions.append(self.version)
                time.sleep(0.05)
            return versions
        finally:
            self.collecting = False

    def push(self):
        self.overlap_unpaused |= self.collecting and not self.paused
        self.version += 1
        self.events.append(("push", self.version))

    def interrupt(self, version):
        self.stop_below = max(self.stop_below, version)
        self.events.append(("interrupt", version))


def test_partial_rollouts_push_into_a_paused_collection_which_resumes_on_the_new_weights():
    gen = PausingGenerators()
    pipe = RolloutPipeline(gen.collect, gen.push, 1, may_start=lambda step, done: step <= 3, version=0, trained=0,
                           interrupt=gen.interrupt)
    gen.pipe = pipe
    seen = {}
    for step in range(1, 4):
        seen[step] = pipe.take(step)
        with pipe.training():
            time.sleep(0.08)  # the next step's collection starts meanwhile
        pipe.trained(step, version=step)
        pipe.done(step)
    pipe.close()
    assert not gen.overlap_unpaused  # weights changed only under a paused collection
    assert ("interrupt", 1) in gen.events and ("pause", 2) in gen.events
    # step 2 started on version 0 (one step off), paused, and finished on version 1
    assert seen[2][0] == 0 and seen[2][-1] == 1 and seen[2] == sorted(seen[2])
    assert gen.events.index(("pause", 2)) < gen.events.index(("push", 1))


def test_partial_rollouts_need_collection_ahead(tmp_path):
    with pytest.raises(ConfigError, match="rollout.partial_rollouts"):
        load_config(None, ["rollout.partial_rollouts=true"])
    cfg = load_config(None, ["rollout.partial_rollouts=true", "rollout.steps_ahead=1", "rollout.max_staleness=1"])
    assert cfg.rollout.partial_rollouts


@pytest.mark.parametrize("ahead", [OFF, AHEAD_2], ids=["k=1", "k=2"])
def test_dapo_dynamic_sampling_draws_and_records_as_the_synchronous_loop(tmp_path, ahead):
    """DAPO's extra rounds run inside a step's collection, so ahead of the learner they draw,
    filter and record what the synchronous loop does."""
    dapo = ("algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=3")
    on, _ = make_trainer(tmp_path / "on", "rollout.max_staleness=2", "stages.0.until_epochs=2", *dapo)
    off, roles = make_trainer(tmp_path / "off", *ahead, *dapo)
    instrument(roles, train_seconds=0.05)
    on.fit()
    off.fit()
    rows = read_metrics(tmp_path / "off")
    assert any(r.get("collect/rounds", 1) > 1 for r in rows), "the fakes never needed a second round"
    for a, b in zip(read_metrics(tmp_path / "on"), rows, strict=True):
        for key in ("epoch", "pool/size", "collect/rounds", "collect/prompts_drawn", "collect/groups_kept",
                    "reward/mean"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert str(on.ledger.state_dict()) == str(off.ledger.state_dict())
