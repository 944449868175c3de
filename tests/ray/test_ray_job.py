"""The README's job path for real: `cluster/start_head.sh --ip 127.0.0.1` starts a Ray
head (its own ports and temp dir, so it cannot meet another Ray on this machine), and
`ray job submit --working-dir . -- python -m srpo_ray.driver ...` runs a one-step
training job on it. The head is started by this test as `ray start --block` in a
process group of its own and stopped by that group (never `ray stop`, which would stop
every Ray on the machine)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers_run import write_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (here: our private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def ray_head():
    """Yields the job API address of a private single-machine Ray head."""
    temp_dir = tempfile.mkdtemp(prefix="srpo-rj-", dir="/tmp")  # short: Ray's socket paths must fit
    gcs, dashboard, client, agent = free_ports(4)
    # Ray 2.60 turns token auth on for a single-machine head; its job CLI sends the token
    # (~/.ray/auth_token) only with RAY_AUTH_MODE=token, so say so on both sides.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen(
        ["bash", str(REPO / "cluster" / "start_head.sh"), "--ip", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "4", "--", "--block", f"--temp-dir={temp_dir}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                    break
            except urllib.error.HTTPError:  # it answers (e.g. 401: Ray's token auth is on): up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the Ray head did not come up:\n"
                                         + (Path(temp_dir) / "head.log").read_text()[-3000:])
                time.sleep(1)
        yield address, env
    finally:
        if head.poll() is None:
            head.terminate()  # `ray start --block` then stops what it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(temp_dir)) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in left:  # stragglers of this head only: they name its temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_checkpoints(ray_head, scripted_model_dir, tmp_path):
    address, env = ray_head
    data = write_data(tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    job_id = f"srpo-test-{os.getpid()}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
         "--working-dir", ".", "--", "python", "-m", "srpo_ray.driver", "--config", "configs/tiny_test.yaml",
         f"model.path={scripted_model_dir}", f"data.train_files=[{data}]", f"trainer.run_dir={run_dir}",
         "trainer.total_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    said = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout).lower()  # without the CLI's colours
    assert f"job '{job_id}' succeeded" in said, (said[-1000:], submit.stdout[-4000:], submit.stderr[-2000:])
    assert submit.returncode == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000001"
    assert (run_dir / "checkpoints" / latest / "hf" / "config.json").is_file()
    # the job's log (what `ray job submit` streams) is the readable console; the actors'
    # output went to the run dir (srpo_ray/telemetry/console.py)
    assert "(GenerationWorker" not in submit.stdout and "(LearnerRank" not in submit.stdout, submit.stdout[-3000:]
    assert "srpo_ray: 1 steps in" in submit.stdout + submit.stderr
    logs = run_dir / "logs"
    assert "vllm" in (logs / "generation-0.log").read_text().lower()
    assert (logs / "reward-0.log").is_file() and (logs / "learner-0.log").is_file()
