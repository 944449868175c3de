"""Faults on a real run (local Ray, real vLLM / reward / FSDP2 actors, the scripted tiny
model of tests/scripted_model.py):

- a generation or reward worker that dies mid-call is replaced and its chunk re-issued:
  the step completes with every prompt scored exactly once; so is one that stops
  answering (SIGSTOP), once its chunk's deadline has passed;
- a learner rank that dies stops the run with an error naming the rank, and `--resume`
  continues from the last checkpoint;
- a run killed while writing a checkpoint keeps the previous one intact;
- a collective whose peer never arrives fails after learner.collective_timeout_s.

Faults are injected by standing in for an actor class through the runtime's fault-test
seam, srpo_ray/runtime/fault_hooks.py (`ActorClassHook`, tests/helpers_run.py): the real
actors are created, and one of them is wrapped so that a chosen call is submitted and the actor is then killed while that call is pending.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import ray
import torch
from helpers_run import KillDuringCall, assert_sampled_with, hook_actor_class, metrics, rollouts, run_args, write_data

from srpo_ray.driver import main

REPO = Path(__file__).resolve().parents[2]
N_SAMPLES = 4  # rollout.n in configs/tiny_test.yaml
PROMPTS_PER_STEP = 4  # run_args


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("faults") / "data.parquet")


def mixed_run_args(model_dir: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Stage 1 at temperature 1: groups are mixed, so step 1 trains and syncs weights
    (with run_args' lr the policy is nearly certain afterwards; a small lr keeps it mixed)."""
    return run_args(model_dir, data, run_dir, "stages.0.temperature=1.0", *extra)


def ledger_samples(run_dir: Path, step: int) -> list[int]:
    """Rollouts the ledger counted per prompt in the open epoch (nonzero entries only)."""
    state = torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt", weights_only=False)
    return sorted(int(x) for x in state["ledger"]["ep_samples"] if x)


def assert_each_prompt_scored_once(run_dir: Path, step: int) -> None:
    groups = rollouts(run_dir, step)
    ids = [g["prompt_id"] for g in groups]
    assert len(ids) == PROMPTS_PER_STEP and len(set(ids)) == PROMPTS_PER_STEP, ids
    assert all(len(g["samples"]) == N_SAMPLES for g in groups)
    # the ledger saw each of the step's prompts once: N_SAMPLES rollouts each, none twice
    assert ledger_samples(run_dir, step) == [N_SAMPLES] * PROMPTS_PER_STEP * step


# ----------------------------------------------------------------------------- worker deaths

@pytest.mark.slow  # a full driver run
def test_generation_worker_killed_mid_step_is_replaced_and_synced(
        ray_local, monkeypatch, capsys, scripted_model_dir, data_file, tmp_path):
    """Worker 0 of two dies in step 2, i.e. after step 1's weight update: its replacement
    must get the new weights (else it refuses to generate: version mismatch) and redo
    the lost chunk; nothing is lost or scored twice."""
    hook = hook_actor_class(
        monkeypatch, "actors.generation", "GenerationWorker",
        fault=lambda h: KillDuringCall(h, "generate_apart", when=lambda prompts, sampling, version=None: version == 1))
    run_dir = tmp_path / "run"
    assert main(mixed_run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=2",
                               "rollout.num_workers=2")) == 0
    assert hook.wrapped.killed, "the fault never fired: step 1 did not update the weights"
    assert len(hook.handles) == 3  # two workers + one replacement
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["policy/version"] == 1
    assert_each_prompt_scored_once(run_dir, 2)
    # Step 2 sampled with version 1 (checkpoint 1): the replacement's rollouts too.
    step2 = rollouts(run_dir, 2)
    assert all(g["policy_version"] == 1 for g in step2)
    assert_sampled_with(step2, run_dir / "checkpoints" / "step_000001" / "hf")


@pytest.mark.slow  # a full driver run
def test_reward_worker_killed_mid_step_is_replaced(ray_local, monkeypatch, scripted_model_dir, data_file, tmp_path):
    hook = hook_actor_class(monkeypatch, "actors.reward", "RewardWorker",
                            fault=lambda h: KillDuringCall(h, "score_texts"))
    run_dir = tmp_path / "run"
    assert main(run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=1")) == 0
    assert hook.wrapped.killed and len(hook.handles) == 2  # one worker + one replacement
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert_each_prompt_scored_once(run_dir, 1)


class StopBeforeFirstCall(ray.actor.ActorHandle):
    """An actor handle whose first call of a method other than `ping` finds the actor's
    process stopped (SIGSTOP), so the call is never answered: a hung worker, not a dead
    one. An ActorHandle to `ray.kill` (what the pool does to a hung worker); everything
    else is the real handle's (ActorHandle.__init__ never runs: no state of its own)."""

    def __init__(self, handle: Any):
        self._handle = handle
        self.pid: int | None = None

    def __del__(self) -> None:
        pass  # the real handle holds the actor's reference, and drops it when it goes

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handle, name)
        if name.startswith("_") or name == "ping" or self.pid is not None:
            return attr
        proxy = self

        class _Method:
            def remote(self, *args: Any, **kwargs: Any) -> Any:
                if proxy.pid is None:
                    proxy.pid = ray.get(proxy._handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=60)
                    os.kill(proxy.pid, signal.SIGSTOP)
                return attr.remote(*args, **kwargs)

        return _Method()

    def release(self) -> None:
        """End the process this test stopped if it is still there, stopped."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, TypeError):
            return
        if state == "T":
            os.kill(self.pid, signal.SIGKILL)


@pytest.mark.slow  # a full driver run
def test_reward_worker_that_stops_answering_is_killed_replaced_and_its_chunk_reissued(
        ray_local, monkeypatch, caplog, scripted_model_dir, data_file, tmp_path):
    hook = hook_actor_class(monkeypatch, "actors.reward", "RewardWorker", fault=StopBeforeFirstCall)
    run_dir = tmp_path / "run"
    try:
        # a deadline short enough for a test (15 s + 0.5 s x 16 responses), long enough for
        # the replacement's scoring call (about a second) on 2 busy cores (it must not be
        # taken for hung too)
        assert main(run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=1",
                             "reward.hung_after_s=15", "reward.hung_after_s_per_response=0.5")) == 0
        assert hook.wrapped.pid is not None and len(hook.handles) == 2  # one worker + one replacement
        stopped = Path(f"/proc/{hook.wrapped.pid}/stat")
        assert not stopped.exists() or stopped.read_text().rpartition(")")[2].split()[0] == "Z", \
            "the hung worker was not killed"
    finally:
        if hook.wrapped is not None:
            hook.wrapped.release()
    assert "reward worker 0 hung; starting a replacement" in caplog.text
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert_each_prompt_scored_once(run_dir, 1)


# ----------------------------------------------------------------------------- learner death

@pytest.mark.slow  # a full driver run
def test_dead_learner_rank_stops_the_run_and_resume_continues(
        ray_local, monkeypatch, capsys, scripted_model_dir, data_file, tmp_path):
    calls = {"train_step": 0}

    def second_train_step(*args: Any) -> bool:
        calls["train_step"] += 1
        return calls["train_step"] == 2

    hook = hook_actor_class(monkeypatch, "actors.learner", "LearnerRank", fault_index=1,
                            fault=lambda h: KillDuringCall(h, "train_step", when=second_train_step))
    run_dir = tmp_path / "run"
    # a small lr keeps the groups mixed after an update, so step 2 trains too
    args = mixed_run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=3", "optim.lr=1e-4")
    assert main(args) == 1  # the driver prints the message and exits non-zero
    assert hook.wrapped.killed
    message = capsys.readouterr().err
    assert "learner rank 1 died during train" in message
    assert "Restart with --resume to continue from" in message and "step_000001" in message
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert [r["step"] for r in metrics(run_dir)] == [1]

    monkeypatch.undo()  # the real learner class again
    assert main(args + ["--resume"]) == 0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["policy/version"] == 2  # continued from version 1, not from scratch
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"


@pytest.mark.slow  # a full driver run
def test_dead_learner_rank_while_the_next_step_generates_ahead_stops_cleanly(
        ray_local, monkeypatch, capsys, scripted_model_dir, data_file, tmp_path):
    """rollout.one_step_off: step 2 is being generated when rank 1 dies in step 1's
    training. The driver waits for that collection, reports the death and exits; no
    thread of the run is left collecting (or starting workers) afterwards."""
    import threading

    hook = hook_actor_class(monkeypatch, "actors.learner", "LearnerRank", fault_index=1,
                            fault=lambda h: KillDuringCall(h, "train_step"))
    args = mixed_run_args(scripted_model_dir, data_file, tmp_path / "run", "trainer.total_steps=3",
                          "trainer.save_every=0", "rollout.one_step_off=true", "rollout.max_staleness=1")
    assert main(args) == 1
    assert hook.wrapped.killed
    assert "learner rank 1 died during train" in capsys.readouterr().err
    assert not [t for t in threading.enumerate() if t.name.startswith("collect-step-")]


# ----------------------------------------------------------------------------- checkpoint kill

def _wait_for(predicate: Callable[[], Any], proc: subprocess.Popen, what: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # a full driver run
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(
        ray_local, scripted_model_dir, data_file, tmp_path):
    """The driver (a subprocess joined to the test's Ray) is frozen with SIGSTOP the
    moment a `step_k.tmp` folder appears (k >= 2), then SIGKILLed: only the driver
    renames a finished checkpoint, so a frozen driver with the .tmp folder still there
    was caught mid-write. If the write finished first, it is resumed and caught at the
    next checkpoint."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    address = ray.get_runtime_context().gcs_address
    args = run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=4",
                    f"cluster.address={address}")
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "srpo_ray.driver", *args], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def new_write() -> list[Path]:  # a first write of checkpoint k >= 2 in progress
        return [p for p in ckpts.glob("step_*.tmp")
                if p.name != "step_000001.tmp" and not p.with_suffix("").exists()]

    try:
        caught = None
        while caught is None:
            tmp = _wait_for(new_write, proc, "a checkpoint write after the first")[0]
            os.kill(proc.pid, signal.SIGSTOP)
            if tmp.exists():
                caught = tmp
            else:  # committed before the stop landed: try the next checkpoint
                os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()
    k = int(caught.name[len("step_"):-len(".tmp")])
    previous = f"step_{k - 1:06d}"
    assert (ckpts / "latest").read_text().strip() == previous
    assert not (ckpts / caught.name[:-len(".tmp")]).exists()
    state = torch.load(ckpts / previous / "trainer_state.pt", weights_only=False)
    assert state["step"] == k - 1

    assert main(run_args(scripted_model_dir, data_file, run_dir, "trainer.total_steps=4", "--resume")) == 0
    assert not list(ckpts.glob("*.tmp")), "resume cleans the partial checkpoint"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert [r["step"] for r in metrics(run_dir)][-(4 - k + 1):] == list(range(k, 5))


# ----------------------------------------------------------------------------- collective timeout

def test_collective_with_a_missing_peer_fails_after_the_timeout(ray_local, scripted_model_dir):
    """Only rank 0 of two is asked for the (collective) full state dict: instead of
    waiting for rank 1 forever it fails once learner.collective_timeout_s has passed."""
    from srpo_ray.config.load import load_config
    from srpo_ray.runtime.learner_group import create_learner_group

    cfg = load_config(REPO / "configs" / "tiny_test.yaml")
    # The timeout also bounds the rendezvous and set-up collectives, so it leaves room
    # for a slow rank on a busy machine; both ranks exist before set-up starts.
    cfg.learner.collective_timeout_s = 10
    group = create_learner_group(cfg, scripted_model_dir, setup=False)
    try:
        ray.get([h.ping.remote() for h in group.handles], timeout=120)
        ray.get([h.setup.remote() for h in group.handles], timeout=120)
        lonely = group.handles[0].full_state_dict.remote()
        with pytest.raises(ray.exceptions.RayTaskError) as failed:
            ray.get(lonely, timeout=120)  # a hang fails the test here instead of blocking it
        # gloo's own error, with the configured timeout: the collective gave up, not Ray
        assert "timed out waiting 10000ms" in str(failed.value).lower()
    finally:
        for handle in group.handles:
            ray.kill(handle)
