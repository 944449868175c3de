"""The console with Ray (srpo_ray/telemetry/console.py): Ray's own logger is quietened and
put back, a dead learner rank names its log file, a dying actor's error still reaches the
user from a driver of its own, and a real run's console is readable. (Without Ray:
tests/unit/test_console.py.)"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from srpo_ray.telemetry.console import console_logging

REPO = Path(__file__).resolve().parents[2]


def _log_some_lines() -> None:
    logging.getLogger("vllm.engine").info("vllm INFO line")
    logging.getLogger("transformers.tokenization").warning("library WARNING line")
    logging.getLogger("ray").warning("ray WARNING line")
    logging.getLogger("srpo_ray.runtime.worker_pool").info("our INFO line")
    logging.getLogger("srpo_ray.runtime.worker_pool").warning("our WARNING line")
    logging.getLogger("somelib").error("library ERROR line")


def test_quiet_console_keeps_our_warnings_and_errors_and_files_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    import ray  # noqa: F401 (sets up its logger, as in the driver)

    ray_logger = logging.getLogger("ray")
    root_handlers, ray_state = list(logging.getLogger().handlers), (list(ray_logger.handlers), ray_logger.propagate)
    assert ray_state[0]
    with console_logging(tmp_path / "run", verbose=False) as logs:
        assert logs == (tmp_path / "run" / "logs").resolve()
        assert os.environ["WANDB_QUIET"] == "true" and not logging.getLogger("ray").handlers
        _log_some_lines()
    console = capsys.readouterr().err
    assert "our WARNING line" in console and "library ERROR line" in console
    for hidden in ("vllm INFO line", "library WARNING line", "ray WARNING line", "our INFO line"):
        assert hidden not in console
    driver_log = (logs / "driver.log").read_text()
    for line in ("vllm INFO line", "library WARNING line", "ray WARNING line", "our INFO line", "library ERROR line"):
        assert line in driver_log
    # everything put back as it was
    assert logging.getLogger().handlers == root_handlers and "WANDB_QUIET" not in os.environ
    assert (ray_logger.handlers, ray_logger.propagate) == ray_state


# A driver of its own (a fresh local Ray, quiet as the real driver starts it) whose
# generation-like workers print, log, and die in their creation task.
FAILING_ACTOR_DRIVER = textwrap.dedent('''
    import logging, os, sys
    import ray
    from srpo_ray.config.load import load_config
    from srpo_ray.telemetry.console import console_logging, with_actor_log, redirect_actor_output
    from srpo_ray.runtime.build import actor_logs, init_ray
    from srpo_ray.runtime.worker_pool import WorkerPool

    class Flaky:
        def __init__(self, index):
            redirect_actor_output()
            print("actor chatter on stdout", flush=True)
            logging.getLogger("vllm").warning("actor library warning")
            raise ValueError(f"engine {index} could not start: KV cache too small")

        def ping(self):
            return True

    Flaky = ray.remote(num_cpus=0.1)(Flaky)
    cfg = load_config(None, [f"trainer.run_dir={sys.argv[1]}", "cluster.local_num_cpus=2"])
    with console_logging(cfg.trainer.run_dir, verbose=False):
        init_ray(cfg, quiet=True)
        logs = actor_logs(cfg)
        pool = WorkerPool("generation", lambda i: Flaky.options(**with_actor_log({}, logs, "generation", i)).remote(i),
                          1, log_dir=logs)
        try:
            pool.map_chunks([1], lambda m, i, c: m.handle.ping.remote())
        finally:
            ray.shutdown()
''')


def test_a_dying_actors_error_reaches_the_console_and_its_output_stays_in_its_file(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(FAILING_ACTOR_DRIVER)
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    console = out.stdout + out.stderr
    assert out.returncode != 0
    # the error, its traceback and where the actor's output is: on the console
    assert "generation worker 0 died; starting a replacement (its output: " in console
    assert "ValueError: engine 0 could not start: KV cache too small" in console
    assert "generation workers keep dying" in console and str(run_dir / "logs" / "generation-0.log") in console
    # the actors' own chatter and Ray's INFO lines: not on the console, in the files
    assert "actor chatter" not in console and "actor library warning" not in console
    assert "Started a local Ray instance" not in console
    actor_log = (run_dir / "logs" / "generation-0.log").read_text()
    assert "actor chatter on stdout" in actor_log and "actor library warning" in actor_log
    assert "KV cache too small" in actor_log  # Ray's report of the creation task, in the actor's file too
    assert "Started a local Ray instance" in (run_dir / "logs" / "driver.log").read_text()


@pytest.mark.slow
def test_a_real_run_prints_a_readable_console(scripted_model_dir, tmp_path):
    """The driver as users run it (its own local Ray, vLLM, reward and learner actors):
    the console has the events and the summary, not vLLM's or Ray's chatter."""
    from helpers_run import run_args, write_data

    data = write_data(tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    args = run_args(scripted_model_dir, data, run_dir, "trainer.total_steps=2", "cluster.local_num_cpus=4")
    out = subprocess.run([sys.executable, "-m", "srpo_ray.driver", *args], capture_output=True, text=True,
                         timeout=540, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    assert "stage 0" in console and "checkpoint" in console and "srpo_ray: 2 steps in" in console
    assert f"logs {run_dir / 'logs'}/" in console
    for chatter in (" INFO ", "WARNING", "(GenerationWorker", "(LearnerRank", "Failed to load weights"):
        assert chatter not in console, (chatter, console[-4000:])
    logs = run_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {"driver.log", "generation-0.log", "reward-0.log", "learner-0.log",
                                                "learner-1.log"}
    assert "vllm" in (logs / "generation-0.log").read_text().lower()
