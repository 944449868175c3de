"""The GPU paths' decisions that live in srpo_ray/runtime/build.py (which imports Ray),
checked without a GPU. (The rest: tests/unit/test_gpu_rules.py.)"""
from __future__ import annotations

from srpo_ray.config.load import load_config

PAPER = "configs/srpo_qwen32b.yaml"


def test_colocated_gpu_runs_sleep_and_ipc_and_set_up_the_learner_first():
    from srpo_ray.runtime.build import generator_options

    colocated = ["cluster.colocate=true", "learner.gpus_per_rank=0.5", "rollout.gpus_per_worker=0.5"]
    assert generator_options(load_config(None, colocated)) == {"weight_transfer": "ipc", "sleep_mode": True}
    assert generator_options(load_config(None, colocated + ["rollout.sleep_while_training=false"]))[
        "sleep_mode"] is False
    assert generator_options(load_config(PAPER)) == {"weight_transfer": "nccl", "sleep_mode": False}
    assert generator_options(load_config(None)) == {"weight_transfer": None, "sleep_mode": False}
