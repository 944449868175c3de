"""Partial rollouts in a real run (vLLM generation, sandboxed rewards, a 2-rank FSDP2
learner on a local Ray): rollout.steps_ahead=1 with rollout.partial_rollouts. Whether a
collection is still running when a step finishes training depends on timing here, so
the run checks what must hold either way: the metrics of pauses and token staleness,
nothing discarded, and every recorded token version between the group's start and the
learner's version. The pause itself is tested on a real worker and fleet in
test_generation.py, and in the pipeline with fakes in tests/unit/test_pipeline.py."""
from __future__ import annotations

import pytest
from helpers_run import driver_run, metrics, rollouts

pytestmark = pytest.mark.slow


def test_a_run_with_partial_rollouts_trains_and_records_token_versions(scripted_model_dir, tmp_path):
    _, run_dir = driver_run(scripted_model_dir, tmp_path, "run", "trainer.total_steps=4", "rollout.steps_ahead=1",
                            "rollout.max_staleness=1", "rollout.partial_rollouts=true", "algo.tis_cap=2.0")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["rollout/stale_discarded"] == 0 and r["rollout/pauses"] >= 0
        assert 0 <= r["rollout/token_staleness_mean"] <= r["rollout/staleness_max"] <= 1
        assert 0 <= r["rollout/resumed_frac"] <= 1
    version_after = {r["step"]: r["policy/version"] for r in rows}
    for step in range(1, 5):
        for group in rollouts(run_dir, step):
            for sample in group["samples"]:
                runs = sample.get("version_runs", [])
                starts = [start for start, _ in runs]
                versions = [group["policy_version"]] + [v for _, v in runs]
                assert starts == sorted(starts) and all(0 <= s <= len(sample["token_ids"]) for s in starts)
                assert versions == sorted(versions) and versions[-1] <= version_after[step]



def test_a_run_at_k2_scales_its_generators_down_while_it_goes(scripted_model_dir, tmp_path):
    """Elastic scaling in asynchronous mode: a resize request written while the run goes
    (as `python -m srpo_ray.scale` writes it) is applied by the collector's next generate
    call, which may retire a worker holding paused groups; the run trains every step,
    discards nothing and stays within k. (Scale-up and a newcomer's weights: the fleet
    tests in test_elastic_fleet.py.)"""
    import threading
    import time

    from srpo_ray.runtime.scale_request import write_scale_request

    run_dir, done = tmp_path / "run", threading.Event()

    def ask_after_step_2() -> None:
        log = run_dir / "metrics.jsonl"
        while not done.is_set():
            if log.exists() and sum(1 for _ in log.open()) >= 2:
                write_scale_request(run_dir, 1)
                return
            time.sleep(0.2)

    asker = threading.Thread(target=ask_after_step_2, daemon=True)
    asker.start()
    try:
        driver_run(scripted_model_dir, tmp_path, "run", "trainer.total_steps=8", "rollout.num_workers=2",
                   "rollout.steps_ahead=2", "rollout.max_staleness=2", "rollout.partial_rollouts=true",
                   "algo.tis_cap=2.0")
    finally:
        done.set()
        asker.join(timeout=5)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    targets = [r["rollout/workers_target"] for r in rows]
    assert targets[0] == 2.0 and targets[-1] == 1.0, targets
    assert all(r["rollout/stale_discarded"] == 0 and r["rollout/staleness_max"] <= 2 for r in rows)
