"""The console (srpo_ray/telemetry/console.py): library and actor output goes to <run_dir>/logs/,
the console keeps ours and the errors, and metrics.verbose / --verbose puts everything
back. (With Ray, a dying actor's error reaching the user: tests/ray/test_console_ray.py.)"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from srpo_ray.config.load import parse_cli
from srpo_ray.telemetry.console import ACTOR_LOG_ENV, console_logging, redirect_actor_output, with_actor_log

REPO = Path(__file__).resolve().parents[2]


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


