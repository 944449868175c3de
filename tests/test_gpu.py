"""The GPU paths: an FSDP2 learner on NCCL, vLLM on CUDA, weight sync between them, and
a short driver run. Skipped where CUDA is absent (the development machine and CI); run
them on a GPU machine with `pytest -m gpu`. NCCL broadcast needs the learner and the
generator on separate GPUs, so that test also needs two."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_TOL = 2e-2  # vLLM's CUDA kernels against an HF forward on the CPU, float32


@pytest.fixture(scope="module")
def gpu_fleet(tiny_model_dir):
    """One vLLM generation worker on a share of GPU 0, in a fleet."""
    import ray

    from actors.generation import GenerationWorker
    from conftest import ensure_local_ray
    from fixtures_models import small_rollout_config
    from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool

    ensure_local_ray()
    cfg = small_rollout_config(gpus_per_worker=0.4, gpu_memory_utilization=0.3)
    pool = WorkerPool("generation", lambda i: GenerationWorker.options(num_cpus=0.5, num_gpus=0.4).remote(
        tiny_model_dir, cfg, "float32", 64, i), 1)
    pool.wait_ready()
    yield RayRolloutFleet(pool)
    for handle in pool.workers:
        ray.kill(handle)


def _assert_holds(fleet, model, version: int) -> None:
    import ray

    from fixtures_models import hf_logprobs
    from test_weight_sync import PROMPT, RESPONSE

    ref = hf_logprobs(model, PROMPT, RESPONSE)
    for handle in fleet.pool.workers:
        assert ray.get(handle.version.remote()) == version
        got = torch.tensor(ray.get(handle.token_logprobs.remote(PROMPT, RESPONSE)))
        assert torch.allclose(got, ref, atol=GPU_TOL), (got, ref)


@pytest.mark.parametrize("transport", ["object_store", "shared_memory"])
def test_nccl_learner_publishes_to_a_cuda_vllm_worker(gpu_fleet, tiny_model_dir, tmp_path, transport):
    import ray
    from transformers import AutoModelForCausalLM

    from actors.learner import create_learner_group
    from fixtures_models import perturbed_state_dict
    from srpo_ray.config import load_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    perturbed_state_dict(model, seed=5)
    model.save_pretrained(tmp_path)
    cfg = load_config(None, ["learner.num_ranks=1", "learner.gpus_per_rank=0.4", "learner.backend=nccl",
                             "rollout.weight_bucket_mb=0.0625"])
    learner = create_learner_group(cfg, str(tmp_path), actor_options=lambda r: {"num_cpus": 0.5, "num_gpus": 0.4})
    try:
        published = ray.get(learner.handles[0].publish_weights.remote(transport))
        gpu_fleet.push_weights(published, gpu_fleet.version + 1)
        _assert_holds(gpu_fleet, model, gpu_fleet.version)
    finally:
        ray.get(learner.handles[0].close_weights.remote())
        ray.kill(learner.handles[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs two GPUs")
def test_nccl_broadcast_from_the_learner_to_a_generator_on_another_gpu(tiny_model_dir, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from actors.generation import GenerationWorker
    from actors.learner import create_learner_group
    from conftest import ensure_local_ray
    from fixtures_models import perturbed_state_dict, small_rollout_config
    from srpo_ray.config import load_config
    from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool

    ensure_local_ray()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    perturbed_state_dict(model, seed=6)
    model.save_pretrained(tmp_path)
    cfg = load_config(None, ["learner.num_ranks=1", "learner.gpus_per_rank=1", "rollout.gpus_per_worker=1",
                             "rollout.weight_transport=broadcast", "rollout.weight_bucket_mb=0.0625"])
    rollout_cfg = small_rollout_config(gpus_per_worker=1.0, gpu_memory_utilization=0.3)
    pool = WorkerPool("generation", lambda i: GenerationWorker.options(num_cpus=0.5, num_gpus=1).remote(
        tiny_model_dir, rollout_cfg, "float32", 64, i), 1)
    learner = create_learner_group(cfg, str(tmp_path), actor_options=lambda r: {"num_cpus": 0.5, "num_gpus": 1})
    try:
        pool.wait_ready()
        fleet = RayRolloutFleet(pool)
        published = ray.get(learner.handles[0].publish_weights.remote())
        assert published.transport == "broadcast" and published.backend == "nccl"
        fleet.push_weights(published, 1)
        _assert_holds(fleet, model, 1)
    finally:
        for handle in pool.workers + list(learner.handles):
            ray.kill(handle)


def test_driver_trains_on_the_gpu(scripted_model_dir, tmp_path):
    """Two steps of the real loop with learner and generator sharing GPU 0."""
    from conftest import ensure_local_ray
    from helpers_run import metrics, run_args, write_data
    from srpo_ray.driver import main

    ensure_local_ray()
    data = write_data(tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    assert main(run_args(scripted_model_dir, data, run_dir, "trainer.total_steps=2", "learner.num_ranks=1",
                         "learner.gpus_per_rank=0.4", "rollout.gpus_per_worker=0.4",
                         "rollout.gpu_memory_utilization=0.3", "cluster.colocate=true")) == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "step_000002" / "hf" / "config.json").exists()
