"""How a vLLM engine is set up, decided from the config alone (pure, no vLLM import):
the process environment it needs before torch is imported, its executor backend, and the
keyword arguments of vllm.LLM. srpo_ray/generation/engines.py builds the engine from them;
the runtime passes engine_env to the worker actor as its env_vars."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from srpo_ray.config.schema import RolloutConfig


def engine_env(rollout_cfg: "RolloutConfig") -> dict[str, str]:
    """The process environment an engine needs (pure). OpenMP reads it when torch is
    first imported: the runtime passes it as the actor's env_vars, and set_engine_env
    applies it again in the worker."""
    env = {"OMP_NUM_THREADS": str(max(1, int(rollout_cfg.cpus_per_worker)))}  # else vLLM pins torch to 1
    if rollout_cfg.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: seconds to start, tensors in RPC
    if rollout_cfg.gpus_per_worker <= 0:
        # Ray no longer hides GPUs from actors that asked for none: a CPU engine on a GPU
        # node would otherwise see (and vLLM pick) the node's GPUs.
        env["CUDA_VISIBLE_DEVICES"] = ""
        if rollout_cfg.one_step_off or rollout_cfg.steps_ahead > 0:
            # Generation runs while the learner trains on the same cores: threads that
            # spin at OpenMP barriers starve it (a SmolLM2 batch took 20-144 s instead
            # of 11-14 s on 2 shared cores). Otherwise OpenMP's default (spin briefly,
            # then sleep) is best: PASSIVE (sleep at once) made evaluation 1.25x slower
            # (bench/bench_eval.py, 2026-12-02).
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def set_engine_env(rollout_cfg: "RolloutConfig") -> None:
    """Apply engine_env to this process before anything imports torch (a worker's first
    line). CUDA_VISIBLE_DEVICES and the multiprocessing switch are enforced; the thread
    settings are defaults that an explicit environment overrides."""
    for key, value in engine_env(rollout_cfg).items():
        if key.startswith("OMP_"):
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def executor_backend(rollout_cfg: "RolloutConfig") -> str | None:
    """vLLM's distributed_executor_backend for this engine. Tensor parallel on GPUs: "mp",
    worker processes inside this actor, which owns all the engine's GPUs through one
    `{GPU: tensor_parallel_size}` bundle (cluster/placement.py). Left unset, vLLM 0.33
    picks its Ray executor inside a placement group (vllm/config/parallel.py,
    ParallelConfig.__post_init__), and that executor refuses a bundle with more than one
    GPU ("Placement group bundle cannot have more than 1 GPU",
    vllm/v1/executor/ray_utils.py initialize_ray_cluster). One GPU: None ("uni")."""
    if rollout_cfg.gpus_per_worker > 0 and rollout_cfg.tensor_parallel_size > 1:
        return "mp"
    return None


def vllm_accepts_bundle(bundle: dict[str, float], backend: str | None, tensor_parallel_size: int) -> bool:
    """Whether vLLM 0.33 can start an engine of `tensor_parallel_size` GPUs from an actor
    placed in `bundle` with `backend`: "mp" needs the actor to see that many GPUs (vLLM
    checks device_count >= world size); "ray" needs one-GPU bundles; "uni" one GPU."""
    gpus = bundle.get("GPU", 0.0)
    if backend == "mp":
        return gpus >= tensor_parallel_size and float(gpus).is_integer()
    if backend == "ray":
        return gpus <= 1
    return tensor_parallel_size == 1 and gpus <= 1


def engine_kwargs(model_path: str, rollout_cfg: "RolloutConfig", dtype: str, max_model_len: int,
                  weight_transfer: str | None = None, sleep_mode: bool = False) -> dict[str, Any]:
    """The keyword arguments of vllm.LLM for this engine (pure: decided from the config,
    never from what the process happens to see). dtype: model.dtype, `auto` resolved
    for this role (bf16 on GPUs, fp32 on CPUs). weight_transfer: "nccl" or "ipc" to
    create vLLM's weight-transfer engine (srpo_ray/weights/nccl.py, cuda_ipc.py).
    sleep_mode: colocated with the learner (vLLM releases its memory while it trains)."""
    from srpo_ray.config.schema import resolve_dtype

    on_gpu = rollout_cfg.gpus_per_worker > 0
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, dtype=resolve_dtype(dtype, on_gpu), seed=rollout_cfg.seed,
        max_model_len=max_model_len, enable_prefix_caching=True,
        # Report log-probs of the distribution actually sampled from (after temperature
        # and top-p), which is what the importance ratio's denominator must be.
        logprobs_mode="processed_logprobs",
    )
    if on_gpu:
        kwargs.update(gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                      tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                      enforce_eager=rollout_cfg.enforce_eager)
        backend = executor_backend(rollout_cfg)
        if backend:
            kwargs["distributed_executor_backend"] = backend
        if rollout_cfg.gpu_kv_cache_memory_bytes > 0:  # a fixed KV cache, not a share of free memory
            kwargs["kv_cache_memory_bytes"] = rollout_cfg.gpu_kv_cache_memory_bytes
        if weight_transfer:
            kwargs["weight_transfer_config"] = {"backend": weight_transfer}
        if sleep_mode:
            kwargs["enable_sleep_mode"] = True
    else:
        # enforce_eager: torch.compile made start-up 8-70 s here (SmolLM2: 68 s) for no
        # measurable gain in sampling speed on CPU.
        kwargs.update(kv_cache_memory_bytes=rollout_cfg.kv_cache_memory_bytes,
                      enforce_eager=True, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len, 4096))
    return kwargs
