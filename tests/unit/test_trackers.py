"""Experiment trackers (srpo_ray/telemetry/trackers.py): the config keys, the start-up error for a
missing client, what the trainer sends them (fake roles), and, for real and offline,
TensorBoard, W&B and MLflow runs read back with each tracker's own reader."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import FakeLearner, FakeRewards, FakeRollout, prompts

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.loop.checkpoint import CheckpointManager
from srpo_ray.loop.trainer import Roles, SRPOTrainer
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup
from srpo_ray.telemetry.metrics import MetricsLogger
from srpo_ray.telemetry.trackers import TABLE_COLUMNS, check_clients, make_trackers


class RecordingTracker:
    def __init__(self):
        self.logged, self.events, self.tables, self.closed = [], [], [], None

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def event(self, step, text):
        self.events.append((step, text))

    def table(self, step, rows):
        self.tables.append((step, rows))

    def close(self, failed=False):
        self.closed = "failed" if failed else "ok"


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"trainer.run_dir={tmp_path}", *overrides])


def _scored(step_texts=("right", "wrong")):
    prompt = Prompt("p1", "math", [{"role": "user", "content": "What is 1+1?"}], "2")
    samples = [Sample([5], [-0.1], t, "length" if t == "cut" else "stop") for t in step_texts]
    results = [RewardResult(float(t == "right"), t == "right", {"timeout": True} if t == "slow" else {})
               for t in step_texts]
    return [ScoredGroup(RolloutGroup.of(prompt, [1, 2], samples, 0), results)]


def _log_a_run(metrics: MetricsLogger) -> None:
    """What a short run sends: events, eval, three steps with rollouts."""
    metrics.event("from step 1: stage 0 (math)")
    metrics.log_eval(0, {"eval/arith/avg@4": 0.25, "time/eval": 1.0}, "arith avg@4=0.250")
    for step in (1, 2, 3):
        metrics.rollouts(step, _scored(("right", "wrong", "cut", "slow")), learner_version=step)
        metrics.log(step, {"reward/mean": step / 10, "pool/size": 12 - step, "note": "text is skipped"})
    metrics.event("before step 4: epoch end, History Resampling: dropped=2")


# ---------------------------------------------------------------- config and start-up


def test_tracker_keys_are_checked_and_the_removed_tensorboard_bool_is_an_unknown_key(tmp_path):
    assert _cfg(tmp_path).metrics.trackers == ["jsonl"]
    with pytest.raises(ConfigError, match="unknown key 'metrics.tensorboard'"):  # before metrics.trackers
        _cfg(tmp_path, "metrics.tensorboard=true")
    with pytest.raises(ConfigError, match=r"metrics.trackers: unknown tracker\(s\) \['comet'\]"):
        _cfg(tmp_path, "metrics.trackers=[jsonl,comet]")
    with pytest.raises(ConfigError, match="must include jsonl"):
        _cfg(tmp_path, "metrics.trackers=[wandb]")
    with pytest.raises(ConfigError, match="metrics.wandb_mode"):
        _cfg(tmp_path, "metrics.wandb_mode=cloud")


def test_a_missing_client_is_a_start_up_error_naming_the_pip_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "alembic")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"includes wandb but wandb is not installed; run `pip install "
                                          r"'srpo-ray\[wandb\]'`"):
        check_clients(_cfg(tmp_path, "metrics.trackers=[jsonl,wandb]"))
    with pytest.raises(ConfigError, match=r"alembic is not installed.*srpo-ray\[mlflow\]"):  # the local store's
        check_clients(_cfg(tmp_path, "metrics.trackers=[jsonl,mlflow]"))
    check_clients(_cfg(tmp_path, "metrics.trackers=[jsonl,mlflow]", "metrics.mlflow_tracking_uri=http://mlflow:5000"))
    # a tracker whose client cannot start (no login, server down) is one clear message too
    import srpo_ray.telemetry.trackers as trackers_mod

    def no_login(*args, **kwargs):
        raise RuntimeError("no API key configured")
    monkeypatch.setattr(trackers_mod, "TensorBoardTracker", no_login)
    with pytest.raises(ConfigError, match=r"tensorboard did not start \(RuntimeError: no API key configured\)"):
        make_trackers(_cfg(tmp_path, "metrics.trackers=[jsonl,tensorboard]"))


# ---------------------------------------------------------------- what the trainer sends


def test_trainer_sends_config_events_generations_and_evals(tmp_path):
    cfg = load_config(None, ["trainer.prompts_per_step=4", "rollout.n=4", "trainer.total_steps=5",
                             f"trainer.run_dir={tmp_path}", "stages.0.until_epochs=1", "metrics.rollouts_per_step=1"])
    tracker = RecordingTracker()
    metrics = MetricsLogger(tmp_path, cfg.trainer.total_steps, progress_bar=False, trackers=[tracker])
    trainer = SRPOTrainer(cfg, prompts(), Roles(FakeRollout(), FakeRewards(), FakeLearner()), 0, metrics,
                          CheckpointManager(tmp_path))
    trainer.fit()
    metrics.close()
    assert [s for s, _ in tracker.logged] == [1, 2, 3, 4, 5]
    assert all(isinstance(v, float) for _, m in tracker.logged for v in m.values())
    assert tracker.logged[3][1]["epoch/dropped"] == 4.0  # History Resampling's metrics too
    texts = [t for _, t in tracker.events]
    assert any("stage 0" in t for t in texts) and any("stage 1" in t for t in texts)
    assert any("History Resampling" in t for t in texts) and any("checkpoint" in t for t in texts)
    assert [s for s, _ in tracker.tables] == [1, 2, 3, 4, 5]
    rows = tracker.tables[0][1]
    assert len(rows) == 4 and set(rows[0]) == set(TABLE_COLUMNS)  # one group of n=4 samples
    assert {r["verdict"] for r in rows} <= {"correct", "wrong"} and rows[0]["prompt"] == "q"
    assert tracker.closed == "ok"


def test_verdicts_and_a_failing_tracker_is_turned_off(tmp_path):
    class Broken(RecordingTracker):
        def log(self, step, metrics):
            raise ConnectionError("server gone")

    good, broken = RecordingTracker(), Broken()
    metrics = MetricsLogger(tmp_path, 3, progress_bar=False, trackers=[broken, good])
    _log_a_run(metrics)
    metrics.close(failed=True)
    assert broken not in metrics.trackers and broken.closed is None and good.closed == "failed"
    assert [s for s, _ in good.logged] == [0, 1, 2, 3]
    assert [r["verdict"] for r in good.tables[0][1]] == ["correct", "wrong", "truncated", "timeout"]
    assert good.events[-1] == (3, "before step 4: epoch end, History Resampling: dropped=2")
    assert "note" not in good.logged[1][1]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # metrics.jsonl keeps everything


# ---------------------------------------------------------------- each tracker for real


def test_tensorboard_run_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "metrics.trackers=[jsonl,tensorboard]")
    metrics = MetricsLogger(tmp_path, 3, progress_bar=False, trackers=make_trackers(cfg))
    _log_a_run(metrics)
    metrics.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert acc.Scalars("eval/arith/avg@4")[0].value == 0.25
    texts = {tag: [t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)]
             for tag in ("config/text_summary", "events/text_summary", "generations/text_summary")}
    assert "total_steps" in texts["config/text_summary"][0]
    assert any("History Resampling" in t for t in texts["events/text_summary"])
    assert "What is 1+1?" in texts["generations/text_summary"][0] and "truncated" in texts["generations/text_summary"][0]


def test_mlflow_run_reads_back_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, "metrics.trackers=[jsonl,mlflow]", "metrics.project=srpo-test", "metrics.run_name=first")
    metrics = MetricsLogger(tmp_path, 3, progress_bar=False, trackers=make_trackers(cfg))
    _log_a_run(metrics)
    metrics.close()
    run_id = json.loads((tmp_path / "tracker_runs.json").read_text())["mlflow"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the run dir's own store
    client = MlflowClient(tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches runs through the global URI
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["trainer.total_steps"] == str(cfg.trainer.total_steps)
    assert run.data.params["stages.0.name"] == cfg.stages[0].name
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert client.get_metric_history(run_id, "eval/arith/avg_at_4")[0].value == 0.25  # '@' is not allowed
    experiment = client.get_experiment_by_name("srpo-test")
    table = client.load_table(experiment.experiment_id, "generations/step_000002.json", run_ids=[run_id])
    assert list(table["verdict"]) == ["correct", "wrong", "truncated", "timeout"]
    assert set(table["prompt"]) == {"What is 1+1?"} and set(table["step"]) == {2}
    events = Path(client.download_artifacts(run_id, "events.txt", str(tmp_path / "dl"))).read_text()
    assert "step 0: from step 1: stage 0 (math)" in events and "History Resampling" in events
    assert "total_steps" in Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()

    resumed = MetricsLogger(tmp_path, 5, progress_bar=False, trackers=make_trackers(cfg, resume=True))
    resumed.start_at(3)
    resumed.event("resumed from step 3")
    resumed.log(4, {"reward/mean": 0.4})
    resumed.close(failed=True)
    assert json.loads((tmp_path / "tracker_runs.json").read_text())["mlflow"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "reward/mean")] == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FAILED"
    events = Path(client.download_artifacts(run_id, "events.txt", str(tmp_path / "dl2"))).read_text()
    assert "stage 0 (math)" in events and events.rstrip().endswith("step 3: resumed from step 3")


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # nothing written to ~
    monkeypatch.setenv("WANDB_QUIET", "true")
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, "metrics.trackers=[jsonl,wandb]", "metrics.wandb_mode=offline", "metrics.project=srpo-test")
    metrics = MetricsLogger(run_dir, 3, progress_bar=False, trackers=make_trackers(cfg))
    _log_a_run(metrics)
    metrics.close()
    run_id = json.loads((run_dir / "tracker_runs.json").read_text())["wandb"]
    [offline_run] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")

    # W&B's own reader of the run's .wandb transaction log
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(offline_run)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert [round(history[s]["reward/mean"], 3) for s in (1, 2, 3)] == [0.1, 0.2, 0.3]
    assert history[0]["eval/arith/avg@4"] == 0.25
    assert history[1]["generations._type"] == "table-file" and history[1]["generations.nrows"] == 4
    [run_record] = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["project"] == "srpo-test" and run_record["display_name"] == run_dir.name
    config = json.loads(json.dumps(run_record["config"]["update"]))
    assert config["trainer"]["total_steps"] == cfg.trainer.total_steps

    media = offline_run / "files"
    generations = json.loads((media / history[2]["generations.path"]).read_text())
    assert generations["columns"] == list(TABLE_COLUMNS)
    assert [row[-1] for row in generations["data"]] == ["correct", "wrong", "truncated", "timeout"]
    events = [row for path in sorted((media / "media" / "table").glob("events_*.table.json"))
              for row in json.loads(path.read_text())["data"]]
    assert [0, "from step 1: stage 0 (math)"] in events
    assert [3, "before step 4: epoch end, History Resampling: dropped=2"] in events

    # --resume: the same W&B run id (offline, a second run dir that `wandb sync` joins)
    [resumed] = make_trackers(cfg, resume=True)
    assert resumed.run_id == run_id
    resumed.close()
