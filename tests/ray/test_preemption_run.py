"""Preemption of a real run: SIGTERM to a `python -m srpo_ray.driver` subprocess (joined to
the test's local Ray) mid-run saves a checkpoint at the end of the step it is in and
exits 0; `--resume` then finishes the run exactly as an uninterrupted one (metrics,
ledger, weights). The stop logic alone, with fake roles: tests/unit/test_preemption.py."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers_run import metrics, run_args, write_data
from safetensors.torch import load_file

from srpo_ray.driver import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def args(model_dir: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Stage 1 at temperature 1 (mixed groups: every step trains, so a resume that lost the
    weights or the optimizer would show), no periodic checkpoints: only the stop saves."""
    return run_args(model_dir, data, run_dir, f"trainer.total_steps={STEPS}", "trainer.save_every=0",
                    "stages.0.temperature=1.0", *extra)


def train_keys(row: dict) -> dict:
    """A metrics row without timings and weight-transfer sizes (--resume pushes the weights
    once more, which step k+1's fleet metrics count)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "weight_sync/"))}


def final_state(run_dir: Path) -> tuple[str, dict]:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest / "trainer_state.pt", weights_only=False)
    return str(state["ledger"]), load_file(str(latest / "hf" / "model.safetensors"))


def sigterm_after_first_step(cmd: list[str], run_dir: Path, log_path: Path) -> int:
    """Run the driver, SIGTERM it once step 1's metrics are written; its exit status."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rows = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 600
            while not (rows.is_file() and rows.read_text().strip()):
                assert proc.poll() is None, f"driver exited ({proc.returncode}) before step 1"
                assert time.monotonic() < deadline, "timed out waiting for step 1"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def test_sigterm_saves_a_checkpoint_exits_0_and_resume_repeats_the_uninterrupted_run(
        ray_local, scripted_model_dir, tmp_path):
    data = write_data(tmp_path / "data.parquet")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(scripted_model_dir, data, full)) == 0

    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "srpo_ray.driver", *args(scripted_model_dir, data, part, f"cluster.address={address}")]
    rc = sigterm_after_first_step(cmd, part, tmp_path / "driver.log")
    output = (tmp_path / "driver.log").read_text(errors="replace")
    assert rc == 0, output[-3000:]
    assert "continue with the same command and --resume" in output
    ckpts = part / "checkpoints"
    k = int((ckpts / "latest").read_text().strip()[len("step_"):])
    assert 1 <= k < STEPS, f"the stop landed after the last step ({k}): nothing was tested"
    assert not list(ckpts.glob("*.tmp"))
    assert torch.load(ckpts / f"step_{k:06d}" / "trainer_state.pt", weights_only=False)["step"] == k
    assert [r["step"] for r in metrics(part)] == list(range(1, k + 1))

    assert main(args(scripted_model_dir, data, part, "--resume")) == 0
    assert [train_keys(r) for r in metrics(part)] == [train_keys(r) for r in metrics(full)]
    (full_ledger, full_weights), (part_ledger, part_weights) = final_state(full), final_state(part)
    assert part_ledger == full_ledger
    assert full_weights.keys() == part_weights.keys()
    for name in full_weights:
        torch.testing.assert_close(part_weights[name], full_weights[name], atol=0, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
