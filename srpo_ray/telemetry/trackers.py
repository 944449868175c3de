"""Experiment trackers (metrics.trackers) behind one small interface, each through its
own client: TensorBoard (torch's SummaryWriter), Weights & Biases (`wandb`), MLflow
(`MlflowClient`). metrics.jsonl is not here: MetricsLogger writes it itself.

Each tracker gets the config once at start, then per-step and evaluation metrics
(`log`), one-off events (`event`: stage switches, History Resampling, checkpoints,
evaluations) and a table of sampled generations per step (`table`). A client is
imported only when its tracker is asked for; a missing one is a ConfigError naming the
pip extra. W&B and MLflow run ids are kept in <run_dir>/tracker_runs.json, so a
`--resume`d run continues the same tracker runs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from srpo_ray.config.load import ConfigError, SRPOConfig, as_dict, to_yaml

TABLE_COLUMNS = ("step", "prompt_id", "domain", "prompt", "response", "reward", "verdict")
RUN_IDS_FILE = "tracker_runs.json"
# the clients each tracker needs: module -> pip package, all in the extra of its name
_CLIENTS = {"tensorboard": {"tensorboard": "tensorboard"},
            "wandb": {"wandb": "wandb"},
            "mlflow": {"mlflow": "mlflow-skinny", "pandas": "pandas"}}
_MLFLOW_LOCAL_STORE = {"sqlalchemy": "sqlalchemy", "alembic": "alembic"}  # its sqlite store


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def event(self, step: int, text: str) -> None: ...
    def table(self, step: int, rows: list[dict[str, Any]]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


def check_clients(cfg: SRPOConfig) -> None:
    """Raise ConfigError, naming the pip extra, for each tracker asked for whose client
    is not installed (before anything slow starts)."""
    for name in cfg.metrics.trackers:
        needed = dict(_CLIENTS.get(name, {}))
        if name == "mlflow" and not _mlflow_uri(cfg.metrics):
            needed.update(_MLFLOW_LOCAL_STORE)
        missing = [pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(f"metrics.trackers includes {name} but {', '.join(missing)} is not installed; "
                              f"run `pip install 'srpo-ray[{name}]'` or drop {name} from metrics.trackers")


def make_trackers(cfg: SRPOConfig, resume: bool = False) -> list[Tracker]:
    """The trackers of metrics.trackers (jsonl excluded), started. resume: continue the
    W&B / MLflow runs recorded in the run dir instead of starting new ones."""
    check_clients(cfg)
    run_dir = Path(cfg.trainer.run_dir).resolve()
    ids_path = run_dir / RUN_IDS_FILE
    known = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    names = [t for t in cfg.metrics.trackers if t != "jsonl"]
    trackers: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir / "tensorboard", to_yaml(cfg)))
            elif name == "wandb":
                trackers.append(WandbTracker(cfg, run_dir, known.get("wandb")))
            elif name == "mlflow":
                trackers.append(MlflowTracker(cfg, run_dir, known.get("mlflow")))
        except BaseException as e:
            for t in trackers:
                t.close(failed=True)
            if not isinstance(e, Exception):
                raise
            raise ConfigError(f"metrics.trackers: {name} did not start ({type(e).__name__}: {e}); check its "
                              f"login or server, run it without one (W&B: metrics.wandb_mode=offline; MLflow: "
                              f"leave metrics.mlflow_tracking_uri and MLFLOW_TRACKING_URI empty for the run "
                              f"dir's own store), or drop {name} from metrics.trackers") from e
    ids = {name: t.run_id for name, t in zip(names, trackers) if getattr(t, "run_id", None)}
    if ids:
        run_dir.mkdir(parents=True, exist_ok=True)
        ids_path.write_text(json.dumps(ids, indent=1))
    return trackers


def generation_rows(step: int, scored: list) -> list[dict[str, Any]]:
    """One row per sample of `scored` (srpo_ray.telemetry.trackers.TABLE_COLUMNS): the prompt's last
    message, the response, its reward and verdict (correct, wrong, truncated, timeout or
    the reward's error). The groups' texts are here (records.here)."""
    rows = []
    for sg in scored:
        prompt = sg.group.prompt
        for sample, result, text in zip(sg.group.samples, sg.results, sg.group.texts):
            rows.append({"step": step, "prompt_id": prompt.prompt_id, "domain": prompt.domain,
                         "prompt": prompt.messages[-1]["content"] if prompt.messages else "",
                         "response": text, "reward": float(result.reward),
                         "verdict": _verdict(sample, result)})
    return rows


def _verdict(sample: Any, result: Any) -> str:
    if result.correct:
        return "correct"
    if result.info.get("timeout"):
        return "timeout"
    if result.info.get("error"):
        return f"error: {result.info['error']}"
    return "truncated" if sample.finish_reason == "length" else "wrong"


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics (trackers take numbers only; non-finite ones too)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def run_name(cfg: SRPOConfig) -> str:
    return cfg.metrics.run_name or Path(cfg.trainer.run_dir).resolve().name


class TensorBoardTracker:
    """Scalars, plus text: the config, events and a markdown table of generations."""

    def __init__(self, log_dir: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def event(self, step: int, text: str) -> None:
        self.writer.add_text("events", text, step)

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(cell(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
        self.writer.add_text("generations", "\n".join(lines), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in <run_dir>/wandb/: metrics by step, the config, an incremental
    `events` table (step, event) and a `generations` table per step."""

    def __init__(self, cfg: SRPOConfig, run_dir: Path, resume_id: str | None = None):
        import wandb

        self.wandb = wandb
        m = cfg.metrics
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=m.project, entity=m.wandb_entity or None, name=run_name(cfg),
                              dir=str(run_dir), mode=m.wandb_mode or None, config=as_dict(cfg),
                              id=resume_id, resume="allow" if resume_id else None)
        self.run_id = self.run.id
        self._events = wandb.Table(columns=["step", "event"], log_mode="INCREMENTAL")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def event(self, step: int, text: str) -> None:
        self._events.add_data(step, text)
        self.run.log({"events": self._events}, step=step)

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        data = [[r[c] for c in TABLE_COLUMNS] for r in rows]
        self.run.log({"generations": self.wandb.Table(columns=list(TABLE_COLUMNS), data=data)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run: metrics by step, the config as params and config.yaml, events.txt,
    and generations/step_NNNNNN.json tables (mlflow's log_table format). Metric names
    keep only the characters MLflow allows: `@` becomes `_at_`, others `_`."""

    def __init__(self, cfg: SRPOConfig, run_dir: Path, resume_id: str | None = None):
        from mlflow import MlflowClient

        m = cfg.metrics
        uri = _mlflow_uri(m)
        artifacts = None
        if not uri:  # the run dir's own store
            run_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{run_dir / 'mlflow.db'}"
            artifacts = (run_dir / "mlflow-artifacts").as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        self._events: list[str] = []
        if resume_id:
            self.run_id = resume_id
            client.update_run(resume_id, status="RUNNING")
            self._events = self._read_events()
        else:
            experiment = client.get_experiment_by_name(m.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(m.project, artifact_location=artifacts))
            self.run_id = client.create_run(experiment_id, run_name=run_name(cfg)).info.run_id
            from mlflow.entities import Param
            client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in _flatten(as_dict(cfg))])
        client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def event(self, step: int, text: str) -> None:
        self._events.append(f"step {step}: {text}")
        self.client.log_text(self.run_id, "\n".join(self._events) + "\n", "events.txt")

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        data = {c: [r[c] for r in rows] for c in TABLE_COLUMNS}
        self.client.log_table(self.run_id, data, f"generations/step_{step:06d}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def _read_events(self) -> list[str]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(self.run_id, "events.txt", tmp)
            except Exception:  # no events yet
                return []
            return Path(path).read_text().splitlines()


def _mlflow_uri(m: Any) -> str:
    return m.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def _mlflow_name(key: str) -> str:
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config dicts/lists -> [("a.b.0.c", value), ...]."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        items = enumerate(tree)
    else:
        return [(prefix, tree)]
    out: list[tuple[str, Any]] = []
    for k, v in items:
        out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out
