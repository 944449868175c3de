"""The GPU paths with vLLM and Ray, all in bfloat16: an FSDP2 learner on NCCL publishing
to a CUDA vLLM engine over every transport one GPU can carry (cuda_ipc, shared_memory,
object_store), sleep/wake around an update, NCCL between two GPUs, and a 2-step
colocated driver run. Skipped where CUDA, vLLM or Ray is missing; tests/gpu/check_device.sh
runs them (after the checks that need neither).

Fits one GPU: each test starts its own actors and kills them before the next, so no
test waits for GPU share another still holds; the driver run needs no bubblewrap (the
2 steps train on math only, and the reward sandbox is off)."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from fixtures_models import PROMPT, RESPONSE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install '.[gpu]')")]

GPU_TOL = 5e-2  # vLLM's bf16 CUDA kernels against an fp32 HF forward of the same bf16 weights
SHARE = 0.4  # of the GPU per actor: a learner and a generator fit together
ENGINE = dict(gpus_per_worker=SHARE, gpu_memory_utilization=0.25, enforce_eager=True)


def _bf16_reference(model_dir: str, seed: int, out_dir) -> torch.nn.Module:
    """A perturbed copy of the model saved to `out_dir`, as the learner will hold it in
    bf16 (the reference forward runs in fp32 on those bf16 values)."""
    from fixtures_models import perturbed_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    perturbed_state_dict(model, seed=seed)
    model.save_pretrained(out_dir)
    return model.to(torch.bfloat16).float()


def _assert_holds(handles, model, version: int) -> None:
    from fixtures_models import assert_workers_hold

    assert_workers_hold(handles, model, version, GPU_TOL)


def _fleet(model_dir: str, sleep: bool = False, weight_transfer: str | None = "ipc"):
    from fixtures_models import small_rollout_config

    from actors.generation import GenerationWorker
    from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool

    cfg = small_rollout_config(**ENGINE)
    pool = WorkerPool("generation", lambda i: GenerationWorker.options(num_cpus=0.5, num_gpus=SHARE).remote(
        model_dir, cfg, "bfloat16", 64, i, weight_transfer=weight_transfer, sleep_mode=sleep), 1)
    pool.wait_ready()
    return RayRolloutFleet(pool, sleep=sleep)


def _learner(model_dir: str, transport: str, *extra: str):
    from srpo_ray.config.load import load_config
    from srpo_ray.runtime.learner_group import create_learner_group

    cfg = load_config(None, ["learner.num_ranks=1", f"learner.gpus_per_rank={SHARE}", "model.dtype=bfloat16",
                             f"rollout.gpus_per_worker={SHARE}", "cluster.colocate=true",
                             f"rollout.weight_transport={transport}", "rollout.weight_bucket_mb=0.0625", *extra])
    return create_learner_group(cfg, model_dir, actor_options=lambda r: {"num_cpus": 0.5, "num_gpus": SHARE})


def _kill(*handles) -> None:
    import ray

    for h in handles:
        ray.kill(h)
    time.sleep(2)  # let Ray take the GPU shares back before the next test asks for them


def test_a_bf16_learner_updates_a_cuda_engine_over_every_one_gpu_transport(tiny_tied_model_dir, tmp_path):
    import ray
    from local_ray import ensure_local_ray

    ensure_local_ray()
    model = _bf16_reference(tiny_tied_model_dir, 5, tmp_path)
    fleet = _fleet(tiny_tied_model_dir)
    learner = _learner(str(tmp_path), "cuda_ipc")
    try:
        before = torch.tensor(ray.get(fleet.pool.workers[0].token_logprobs.remote(PROMPT, RESPONSE)))
        for transport in ("cuda_ipc", "shared_memory", "object_store"):
            published = learner.publish_weights(transport)
            assert published.transport == transport
            fleet.push_weights(published, fleet.version + 1)
            _assert_holds(fleet.pool.workers, model, fleet.version)
        after = torch.tensor(ray.get(fleet.pool.workers[0].token_logprobs.remote(PROMPT, RESPONSE)))
        assert (after - before).abs().max() > 0.2  # the weights did change
    finally:
        learner.close_weights()
        _kill(*fleet.pool.workers, *learner.handles)


def test_a_sleeping_engine_wakes_for_the_update_and_for_sampling(tiny_model_dir, tmp_path):
    from local_ray import ensure_local_ray

    from srpo_ray.records import Prompt, Sampling

    ensure_local_ray()
    model = _bf16_reference(tiny_model_dir, 6, tmp_path)
    fleet = _fleet(tiny_model_dir, sleep=True)
    learner = _learner(str(tmp_path), "cuda_ipc")
    prompts = [Prompt("p", "math", [{"role": "user", "content": "1 + 1?"}], "2")]
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    try:
        assert len(fleet.generate(prompts, sampling.with_seed(0))) == 1  # then it sleeps
        assert fleet.pool.ready()[0].asleep == ("weights", "kv_cache")
        fleet.push_weights(learner.publish_weights(), 1)  # wakes the weights only
        assert fleet.pool.ready()[0].asleep == ("kv_cache",)
        groups = fleet.generate(prompts, sampling.with_seed(1))
        assert groups[0].policy_version == 1
        fleet.wake()
        _assert_holds(fleet.pool.workers, model, 1)
    finally:
        learner.close_weights()
        _kill(*fleet.pool.workers, *learner.handles)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between learner and generator needs two GPUs")
def test_nccl_from_the_learner_to_a_generator_on_another_gpu(tiny_model_dir, tmp_path):
    from fixtures_models import small_rollout_config
    from local_ray import ensure_local_ray

    from actors.generation import GenerationWorker
    from srpo_ray.config.load import load_config
    from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool
    from srpo_ray.runtime.learner_group import create_learner_group

    ensure_local_ray()
    model = _bf16_reference(tiny_model_dir, 7, tmp_path)
    cfg = load_config(None, ["learner.num_ranks=1", "learner.gpus_per_rank=1", "rollout.gpus_per_worker=1",
                             "model.dtype=bfloat16", "rollout.weight_bucket_mb=0.0625"])
    rollout_cfg = small_rollout_config(gpus_per_worker=1.0, gpu_memory_utilization=0.3, enforce_eager=True)
    pool = WorkerPool("generation", lambda i: GenerationWorker.options(num_cpus=0.5, num_gpus=1).remote(
        tiny_model_dir, rollout_cfg, "bfloat16", 64, i, weight_transfer="nccl"), 1)
    learner = create_learner_group(cfg, str(tmp_path), actor_options=lambda r: {"num_cpus": 0.5, "num_gpus": 1})
    try:
        pool.wait_ready()
        fleet = RayRolloutFleet(pool)
        for version in (1, 2):  # the second send reuses the group
            published = learner.publish_weights()
            assert published.transport == "nccl"
            fleet.push_weights(published, version)
            _assert_holds(fleet.pool.workers, model, version)
    finally:
        learner.close_weights()
        _kill(*pool.workers, *learner.handles)


def test_driver_trains_two_steps_colocated_on_one_gpu(scripted_model_dir, tmp_path):
    from helpers_run import metrics, run_args, write_data
    from local_ray import ensure_local_ray

    from srpo_ray.driver import main

    ensure_local_ray()
    data = write_data(tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    assert main(run_args(scripted_model_dir, data, run_dir, "trainer.total_steps=2", "learner.num_ranks=1",
                         f"learner.gpus_per_rank={SHARE}", f"rollout.gpus_per_worker={SHARE}",
                         "rollout.gpu_memory_utilization=0.25", "rollout.enforce_eager=true",
                         "model.dtype=bfloat16", "cluster.colocate=true", "reward.sandbox=UNSAFE_no_sandbox",
                         "stages.0.temperature=1.0")) == 0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "checkpoints" / "step_000002" / "hf" / "config.json").exists()
    trained = [r for r in rows if "learner/logprob_mismatch" in r]
    assert trained and all(r["learner/logprob_mismatch"] < 0.05 for r in trained)  # bf16 both sides
