"""What the driver's console shows, and where everything else goes.

Default: the console keeps the progress bar, the run's events (stage switches, History
Resampling, evaluations, checkpoints), srpo_ray's warnings and errors, every library's
errors, and the final summary. The rest goes to files in <run_dir>/logs/:
- driver.log: every log line of the driver process (Ray, transformers, ...); W&B and
  MLflow, which print through their own handlers, are told to be quiet (WANDB_QUIET,
  MLFLOW_LOGGING_LEVEL=WARNING) unless those are set.
- <role>-<index>.log (generation-0.log, reward-0.log, learner-0.log): an actor's whole
  output, vLLM's and torch's included (its stdout and stderr file descriptors point
  there: `redirect_actor_output`, first thing in each actor's __init__).
Errors still reach the console: an actor's exception comes back through Ray with its
traceback, Ray reports dead workers on its error channel (printed whatever
log_to_driver says), and a replaced worker or a dead learner rank names its log file.
metrics.verbose (`--verbose`) puts everything back on the console instead.

Pure: no Ray here (the runtime passes the options this module builds).
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ACTOR_LOG_ENV = "SRPO_ACTOR_LOG"  # the file an actor's output goes to
OUR_LOGGERS = ("srpo_ray", "actors", "cluster")
# Client libraries that would print to the console on their own (banners, summaries,
# INFO lines): quiet unless the user set them.
QUIET_ENV = {"WANDB_QUIET": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
# Libraries that log through a console handler of their own (not propagating to the
# root logger), set up when they are imported: routed through ours while quiet.
OWN_HANDLERS = ("ray", "transformers")


def log_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "logs"


def actor_log_file(logs: str | Path, role: str, index: int) -> str:
    return str(Path(logs) / f"{role}-{index}.log")


def with_actor_log(options: dict[str, Any], logs: str | Path | None, role: str, index: int) -> dict[str, Any]:
    """Ray actor options whose runtime_env sends the actor's output to its log file in
    `logs` (None: unchanged, the output goes where Ray sends it)."""
    if logs is None:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), ACTOR_LOG_ENV: actor_log_file(logs, role, index)}
    return {**options, "runtime_env": runtime_env}


def redirect_actor_output() -> None:
    """If SRPO_ACTOR_LOG names a file, append this process's stdout and stderr (file
    descriptors 1 and 2, so C libraries and child processes too) to it. Never raises:
    where the file cannot be written the output stays where it was."""
    path = os.environ.get(ACTOR_LOG_ENV)
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        print(f"srpo_ray: cannot write {path} ({e}); this actor's output stays in Ray's worker logs",
              file=sys.stderr, flush=True)
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _ConsoleFilter(logging.Filter):
    """Quiet console: srpo_ray's warnings and errors, other libraries' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in OUR_LOGGERS
        return record.levelno >= (logging.WARNING if ours else logging.ERROR)


class _TqdmHandler(logging.StreamHandler):
    """Writes above a progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its directory and file only when a line comes (a run
    stopped by a config error leaves no empty run dir behind)."""

    def _open(self):  # noqa: ANN202 (logging's own signature)
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def console_logging(run_dir: str | Path, verbose: bool) -> Iterator[Path | None]:
    """The driver's logging for one run: every line at INFO and up to
    <run_dir>/logs/driver.log; on the console, everything (verbose) or only what the
    module docstring lists. Yields the log dir (None when verbose: nothing is routed
    away). Restores the logging setup and environment it found."""
    logs = log_dir(run_dir)
    root = logging.getLogger()
    saved_level = root.level
    own = {name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers)) for name in OWN_HANDLERS}
    file_handler = _LazyFileHandler(logs / "driver.log", delay=True)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    if not verbose:
        console.addFilter(_ConsoleFilter())
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        # their lines reach our handlers instead (the runtime then starts or joins Ray
        # with configure_logging=False, so Ray does not set its handler up again)
        for name, (_, handlers) in own.items():
            logging.getLogger(name).propagate = True
            for h in handlers:
                logging.getLogger(name).removeHandler(h)
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    try:
        yield None if verbose else logs
    finally:
        root.removeHandler(console)
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(saved_level)
        for name, (propagate, handlers) in own.items():
            logger = logging.getLogger(name)
            logger.propagate = propagate
            for h in handlers:
                if h not in logger.handlers:
                    logger.addHandler(h)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
