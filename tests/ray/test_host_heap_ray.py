"""rollout.host_heap in a generation worker (actors/generation.py): the policy is set before
the engine starts. (The policies themselves: tests/unit/test_host_heap.py.)"""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("gpus, setting, applied", [(0, "auto", "reuse"), (1, "auto", "trim"), (0, "compact", "compact")])
def test_a_generation_worker_sets_rollout_host_heap_before_its_engine_starts(monkeypatch, tiny_model_dir,
                                                                             gpus, setting, applied):
    import actors.generation as generation
    from srpo_ray.config.load import load_config

    events = []
    monkeypatch.setattr(generation, "set_heap_policy", lambda policy: events.append(("heap", policy)))
    monkeypatch.setattr(generation, "set_engine_env", lambda cfg: None)  # leave this process's env alone
    monkeypatch.setattr(generation, "create_engine", lambda *a: events.append(("engine", None)))
    rollout = load_config(None, [f"rollout.gpus_per_worker={gpus}", f"rollout.host_heap={setting}"]).rollout
    generation.GenerationWorkerImpl(tiny_model_dir, rollout, "float32", 32, 0)
    assert events == [("heap", applied), ("engine", None)]
