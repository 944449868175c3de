"""The console (srpo_ray/telemetry/console.py): library and actor output goes to <run_dir>/logs/,
the console keeps ours and the errors, a dying actor's error still reaches the user, and
metrics.verbose / --verbose puts everything back."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from srpo_ray.config.load import parse_cli
from srpo_ray.telemetry.console import ACTOR_LOG_ENV, console_logging, redirect_actor_output, with_actor_log

REPO = Path(__file__).resolve().parent.parent


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


def test_verbose_console_shows_library_lines_and_routes_no_actor(tmp_path, capsys):
    with console_logging(tmp_path, verbose=True) as logs:
        assert logs is None
        logging.getLogger("vllm.engine").info("vllm INFO line")
    assert "vllm INFO line" in capsys.readouterr().err
    assert parse_cli(["--verbose"])[0].metrics.verbose and not parse_cli([])[0].metrics.verbose


def test_no_log_dir_is_made_before_a_line_is_logged(tmp_path):
    with console_logging(tmp_path / "run", verbose=False):
        pass
    assert not (tmp_path / "run").exists()  # a run stopped by a config error leaves nothing behind


def test_actor_options_keep_their_env_and_get_a_log_file(tmp_path):
    options = {"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}
    logged = with_actor_log(options, tmp_path, "generation", 3)
    assert logged["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "1",
                                                 ACTOR_LOG_ENV: str(tmp_path / "generation-3.log")}
    assert options["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "1"} and logged["num_cpus"] == 1
    assert with_actor_log(options, None, "generation", 3) is options


def test_redirect_sends_file_descriptors_to_the_file(tmp_path):
    log = tmp_path / "logs" / "reward-0.log"
    script = ("import os, sys; from srpo_ray.telemetry.console import redirect_actor_output; print('before', flush=True); "
              "redirect_actor_output(); print('python line'); os.write(2, b'C line\\n'); "
              "os.system('echo child line')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, ACTOR_LOG_ENV: str(log), "PYTHONPATH": str(REPO)})
    assert out.stdout == "before\n" and out.stderr == ""
    assert sorted(log.read_text().splitlines()) == ["C line", "child line", "python line"]
    # an unwritable path leaves the output where it was, with one line saying why
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, ACTOR_LOG_ENV: "/proc/nope/x.log", "PYTHONPATH": str(REPO)})
    assert "python line" in out.stdout and "cannot write /proc/nope/x.log" in out.stderr
    redirect_actor_output()  # no SRPO_ACTOR_LOG here: a no-op


def test_a_dead_learner_rank_names_its_log_file(monkeypatch):
    import srpo_ray.runtime.learner_group as lg

    class Rank:
        class setup:
            @staticmethod
            def remote():
                return "ref"

    def get(refs):
        raise RuntimeError("connection closed")
    monkeypatch.setattr(lg, "_dead_rank", lambda e, refs, ranks: (1, RuntimeError("the actor died: SIGKILL")))
    group = lg.LearnerGroup([Rank(), Rank()], "token-mean", get=get, last_checkpoint=lambda: "runs/x/step_000004")
    group.log_dir = "/runs/x/logs"
    with pytest.raises(lg.LearnerRankDiedError, match=r"resume to continue from runs/x/step_000004\. Its output: "
                                                      r"/runs/x/logs/learner-1\.log\. Ray's report: the actor died"):
        group.setup()


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
