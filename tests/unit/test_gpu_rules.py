"""The GPU paths' decisions, checked without a GPU (issue #10): what each role runs on
and in which dtype is decided from the config; the paper's 32B plan gives vLLM bundles it
accepts; `auto` picks NCCL only between whole GPUs of separate roles; fractional learner
ranks only colocated to whole GPUs; float16 training refused; entropy as a metric is
chunked and gradient-free; enforce_eager and a fixed GPU KV cache reach vLLM."""
from __future__ import annotations

import os

import pytest
import torch

from cluster.placement import plan_placement
from srpo_ray.config.load import ConfigError, load_config, resolve_dtype
from srpo_ray.generation.engine_setup import engine_kwargs, executor_backend, set_engine_env, vllm_accepts_bundle
from srpo_ray.learner.core import _pick_backend, token_logprobs
from srpo_ray.weights.transport import resolve_transport

PAPER = "configs/srpo_qwen32b.yaml"


# ----------------------------------------------------------------------------- defect 1

def test_the_32b_plan_gives_each_engine_one_bundle_vllm_accepts():
    cfg = load_config(PAPER)
    plan = plan_placement(cfg)
    bundles = plan.group("srpo-rollout").bundles
    assert bundles == tuple({"CPU": 8.0, "GPU": 4.0} for _ in range(8))
    kwargs = engine_kwargs(cfg.model.path, cfg.rollout, cfg.model.dtype, 18432, weight_transfer="nccl")
    assert kwargs["distributed_executor_backend"] == "mp" and kwargs["tensor_parallel_size"] == 4
    assert all(vllm_accepts_bundle(b, "mp", 4) for b in bundles)
    # what vLLM picked before (its Ray executor inside a placement group) refuses them
    assert not any(vllm_accepts_bundle(b, "ray", 4) for b in bundles)
    assert all(vllm_accepts_bundle(b, None, 1) for b in plan.group("srpo-learner").bundles)
    assert kwargs["dtype"] == "bfloat16" and kwargs["weight_transfer_config"] == {"backend": "nccl"}
    assert "kv_cache_memory_bytes" not in kwargs and kwargs["gpu_memory_utilization"] == 0.85


def test_one_gpu_and_cpu_engines_leave_the_executor_to_vllm():
    cfg = load_config(None, ["rollout.gpus_per_worker=1"])
    assert executor_backend(cfg.rollout) is None
    assert executor_backend(load_config(None).rollout) is None


# ----------------------------------------------------------------------------- defect 5

def test_devices_follow_the_config_not_what_the_process_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU node
    assert _pick_backend("auto", 0) == "gloo"
    assert _pick_backend("auto", 1) == "nccl"
    cpu = load_config(None).rollout
    kwargs = engine_kwargs("/m", cpu, "auto", 256)
    assert kwargs["dtype"] == "float32" and "gpu_memory_utilization" not in kwargs and kwargs["enforce_eager"]
    monkeypatch.setattr(os, "environ", dict(os.environ, CUDA_VISIBLE_DEVICES="0,1"))
    set_engine_env(cpu)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # a CPU engine on a GPU node sees no GPU
    with pytest.raises(ConfigError, match="learner.backend"):
        load_config(None, ["learner.backend=nccl"])


# ----------------------------------------------------------------------------- defect 6

def test_auto_picks_nccl_only_for_whole_gpus_of_separate_roles():
    assert resolve_transport("auto", 1, 4, False, 4) == "nccl"
    assert resolve_transport("auto", 2, 1, False) == "nccl"
    assert resolve_transport("auto", 0.5, 1, False) == "object_store"  # two ranks might share a GPU
    assert resolve_transport("auto", 1, 0.5, False) == "object_store"
    assert resolve_transport("auto", 0.5, 0.5, True, 1) == "cuda_ipc"
    assert resolve_transport("auto", 0.5, 0.5, True, 2) == "object_store"
    assert resolve_transport("auto", 1, 0, False) == "object_store"
    assert resolve_transport("broadcast", 1, 1, False) == "nccl"  # between GPUs, broadcast is NCCL
    with pytest.raises(ValueError, match="Duplicate GPU"):
        resolve_transport("nccl", 0.5, 1, False)
    with pytest.raises(ValueError, match="cluster.colocate=true"):
        resolve_transport("cuda_ipc", 1, 1, False)
    with pytest.raises(ConfigError, match="rollout.weight_transport=nccl"):
        load_config(None, ["rollout.weight_transport=nccl", "learner.gpus_per_rank=1",
                           "rollout.gpus_per_worker=0.5"])


def test_fractional_learner_ranks_only_colocated_to_whole_gpus():
    two = ["learner.num_ranks=2", "learner.gpus_per_rank=0.5", "rollout.gpus_per_worker=0.5",
           "rollout.num_workers=2"]
    with pytest.raises(ConfigError, match="learner.gpus_per_rank=0.5 with learner.num_ranks=2"):
        plan_placement(load_config(None, two))
    plan = plan_placement(load_config(None, two + ["cluster.colocate=true"]))
    assert [b["GPU"] for b in plan.group("srpo-colocated").bundles] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="exactly one GPU"):
        plan_placement(load_config(None, two[:-2] + ["rollout.gpus_per_worker=0.25", "rollout.num_workers=2",
                                                     "cluster.colocate=true"]))
    plan_placement(load_config(None, ["learner.num_ranks=1", "learner.gpus_per_rank=0.5"]))  # one rank: no peer


# ----------------------------------------------------------------------------- defect 9

def test_precision_auto_is_bf16_on_gpus_and_float16_training_is_refused():
    assert load_config(None, ["model.dtype=auto"]).model.dtype == "auto"
    assert (resolve_dtype("auto", True), resolve_dtype("auto", False)) == ("bfloat16", "float32")
    assert resolve_dtype("float32", True) == "float32"
    with pytest.raises(ConfigError, match="model.dtype: float16 is refused.*bfloat16"):
        load_config(None, ["model.dtype=float16"])
    gpu = load_config(None, ["rollout.gpus_per_worker=1", "model.dtype=auto"])
    assert engine_kwargs("/m", gpu.rollout, gpu.model.dtype, 256)["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- defect 10

def test_entropy_as_a_metric_is_chunked_and_has_no_graph(monkeypatch):
    import srpo_ray.learner.core as core

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50, requires_grad=True)
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.zeros(3, 9)
    mask[:, 3:] = 1
    rows = logits[:, :-1][mask[:, 1:].bool()].float() / 0.7
    full = -(torch.softmax(rows, -1) * torch.log_softmax(rows, -1)).sum(-1)
    monkeypatch.setattr(core, "ENTROPY_CHUNK_ROWS", 4)  # 18 rows: 5 chunks
    lp, metric = token_logprobs(logits, ids, mask, 0.7, with_entropy=True, entropy_grad=False)
    assert metric.grad_fn is None and lp.grad_fn is not None
    torch.testing.assert_close(metric[mask.bool()], full.detach(), atol=1e-5, rtol=1e-5)
    _, term = token_logprobs(logits, ids, mask, 0.7, with_entropy=True, entropy_grad=True)
    assert term.grad_fn is not None
    torch.testing.assert_close(term[mask.bool()], full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- defects 8, 11

def test_gpu_engine_options_reach_vllm():
    cfg = load_config(None, ["rollout.gpus_per_worker=1", "rollout.enforce_eager=true",
                             "rollout.gpu_kv_cache_memory_bytes=1073741824"])
    kwargs = engine_kwargs("/m", cfg.rollout, "auto", 256, weight_transfer="ipc", sleep_mode=True)
    assert kwargs["enforce_eager"] is True and kwargs["kv_cache_memory_bytes"] == 1 << 30
    assert kwargs["enable_sleep_mode"] is True and kwargs["weight_transfer_config"] == {"backend": "ipc"}
    assert not engine_kwargs("/m", load_config(None, ["rollout.gpus_per_worker=1"]).rollout, "auto",
                             256)["enforce_eager"]


def test_engine_environment_by_role():
    """OpenMP's default wait policy (spin briefly, then sleep) unless generation overlaps
    training on the same CPU cores (one-step-off), where spinning threads starve the
    learner; GPU engines set no wait policy and keep the GPUs visible."""
    from srpo_ray.config.schema import RolloutConfig
    from srpo_ray.generation.engine_setup import engine_env

    cpu = engine_env(RolloutConfig(cpus_per_worker=2))
    assert cpu == {"OMP_NUM_THREADS": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "CUDA_VISIBLE_DEVICES": ""}
    assert engine_env(RolloutConfig(cpus_per_worker=2, one_step_off=True))["OMP_WAIT_POLICY"] == "PASSIVE"
    gpu = engine_env(RolloutConfig(gpus_per_worker=1, tensor_parallel_size=2, one_step_off=True))
    assert "OMP_WAIT_POLICY" not in gpu and "CUDA_VISIBLE_DEVICES" not in gpu
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu  # TP engines run vLLM's worker processes
