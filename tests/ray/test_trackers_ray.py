"""Experiment trackers through the driver (srpo_ray/driver.py, which imports the Ray
runtime): a missing client stops the run before the model loads or Ray starts. (The
trackers themselves: tests/unit/test_trackers.py.)"""
from __future__ import annotations

import importlib.util


def test_the_driver_stops_on_a_missing_client_before_starting_ray(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "alembic")
                        else real(name, *a))
    from srpo_ray.driver import main
    assert main([f"trainer.run_dir={tmp_path}", "metrics.trackers=[jsonl,wandb]", "model.path=/nowhere"]) == 2
    assert "pip install 'srpo-ray[wandb]'" in capsys.readouterr().err
