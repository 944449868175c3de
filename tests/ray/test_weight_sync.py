"""Bucketed, versioned weight sync (srpo_ray/weights/: layout, transports, the fleet's deliveries).

Pure bucketing first; then real Ray, real vLLM generation workers (two of the untied
tiny model, one of the tied one) receiving weights from a WeightSource actor over each
transport, and from a real one-rank FSDP2 learner. A sync counts as delivered only
if vLLM's log-probs equal an HF forward of the new weights.
"""
from __future__ import annotations

import pytest
import ray
import torch
from fixtures_models import (
    PROMPT,
    RESPONSE,
    assert_workers_hold,
    perturbed_state_dict,
    small_rollout_config,
)
from local_ray import ensure_local_ray
from transformers import AutoModelForCausalLM

from actors.generation import GenerationWorker
from actors.learner import MB, WeightSourceActor, sender_for
from srpo_ray.config.load import ConfigError, SRPOConfig, load_config
from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool
from srpo_ray.runtime.learner_group import create_learner_group
from srpo_ray.weights.layout import bucket_parts, pack_bucket, plan_buckets, unpack_bucket, unpack_parts
from srpo_ray.weights.transport import resolve_transport

TOL = 1e-3
BUCKET_BYTES = 64 << 10  # the tiny models (~0.6 MB) then travel in about ten buckets


# ----------------------------------------------------------------------------- pure

def test_buckets_round_trip_every_dtype_and_send_tied_tensors_once():
    emb = torch.randn(20, 8)
    state = {"ids": torch.arange(7), "model.embed_tokens.weight": emb, "half": torch.randn(3, 5).bfloat16(),
             "big": torch.randn(300), "flag": torch.tensor([True, False]), "lm_head.weight": emb}
    buckets = plan_buckets(state, bucket_bytes=1024)
    assert len(buckets) == 3  # [ids, emb, half, +lm_head] [big: larger than a bucket] [flag]
    assert [s.name for s in buckets[0].slots][-1] == "lm_head.weight"  # joins its twin's bucket
    assert buckets[0].nbytes < 2 * emb.numel() * 4  # the tied matrix is sent once
    assert all(s.offset % 64 == 0 for b in buckets for s in b.slots)
    packed = dict(kv for b in buckets for kv in unpack_bucket(pack_bucket(state, b), b))
    parts = dict(kv for b in buckets for kv in unpack_parts([p.clone() for p in bucket_parts(state, b)], b))
    for out in (packed, parts):
        assert out.keys() == state.keys()
        for name, tensor in state.items():
            assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
    assert len(bucket_parts(state, buckets[0])) == 3  # ids, the tied matrix once, half


def test_bad_sizes_and_transports_are_refused():
    with pytest.raises(ValueError, match="weight_bucket_mb"):
        plan_buckets({"a": torch.zeros(2)}, 0)
    with pytest.raises(ValueError, match="rollout.weight_transport='carrier pigeon'"):
        resolve_transport("carrier pigeon", 0, 0, False)
    with pytest.raises(ValueError, match="bucket of 3 bytes"):
        next(unpack_bucket(torch.zeros(3, dtype=torch.uint8), plan_buckets({"a": torch.zeros(2)}, 64)[0]))
    for override, key in (("rollout.weight_transport=udp", "rollout.weight_transport"),
                          ("rollout.weight_bucket_mb=0", "rollout.weight_bucket_mb"),
                          ("rollout.max_staleness=-1", "rollout.max_staleness")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_auto_picks_nccl_only_where_nccl_can_carry_it():
    assert resolve_transport("auto", 0, 0, False) == "shared_memory"  # CPU: measured fastest
    assert resolve_transport("auto", 1, 0, False) == "object_store"
    assert resolve_transport("auto", 1, 1, False) == "nccl"
    assert resolve_transport("auto", 0.5, 0.5, True) == "cuda_ipc"  # colocated: one GPU, read in place
    assert resolve_transport("broadcast", 0, 0, False) == "broadcast"
    cfg = SRPOConfig()
    cfg.rollout.weight_bucket_mb = 0.5
    sender = sender_for(cfg)
    assert (sender.transport, sender.settings.bucket_bytes) == ("shared_memory", MB // 2)


# ----------------------------------------------------------------------------- real Ray + vLLM

def generation_pool(model_dir: str, size: int, **rollout_overrides) -> WorkerPool:
    """Real generation workers (tiny model, in-process vLLM) in an elastic pool."""
    cfg = small_rollout_config(**rollout_overrides)
    env = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

    def factory(index: int):
        return GenerationWorker.options(num_cpus=0.5, runtime_env={"env_vars": env}).remote(
            model_dir, cfg, "float32", 64, index)
    return WorkerPool("generation", factory, size)


def assert_holds(handles, model, version: int) -> None:
    assert_workers_hold(handles, model, version, TOL)


@pytest.fixture(scope="module", params=["untied", "tied"])
def workers(request, tiny_model_dir, tiny_tied_model_dir):
    """(model dir, fleet of started workers, weight source) per model kind: two
    workers of the untied model, one of the tied model (each start costs seconds)."""
    ensure_local_ray()
    model_dir = tiny_model_dir if request.param == "untied" else tiny_tied_model_dir
    pool = generation_pool(model_dir, 2 if request.param == "untied" else 1)
    pool.wait_ready()
    source = WeightSourceActor.options(num_cpus=0.1).remote("object_store", BUCKET_BYTES)
    yield model_dir, RayRolloutFleet(pool), source
    ray.get(source.close_weights.remote())
    for handle in pool.workers + [source]:
        ray.kill(handle)


@pytest.mark.parametrize("transport", ["shared_memory", "object_store", "broadcast"])
def test_transport_delivers_the_exact_weights_to_every_worker(workers, transport):
    model_dir, fleet, source = workers
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = torch.tensor(ray.get(fleet.pool.workers[0].token_logprobs.remote(PROMPT, RESPONSE)))
    for step in (1, 2):  # twice: the second broadcast reuses the group
        version = fleet.version + 1
        state = perturbed_state_dict(model, seed=10 * step + len(transport))  # fresh weights for each test
        published = ray.get(source.publish.remote(state, transport))
        assert published.transport == transport and len(published.buckets) > 3
        fleet.push_weights(published, version)
        assert_holds(fleet.pool.workers, model, version)
    after = torch.tensor(ray.get(fleet.pool.workers[0].token_logprobs.remote(PROMPT, RESPONSE)))
    assert (after - before).abs().max() > 1e-2  # the weights did change
    metrics = fleet.pop_metrics()
    assert metrics["weight_sync/bytes"] == published.nbytes
    assert metrics["time/weight_load"] > 0  # the slowest worker's load, timed inside it
    assert "time/weight_load" not in fleet.pop_metrics()  # each load is reported once


def test_a_refused_state_dict_leaves_the_old_weights_and_version(workers):
    model_dir, fleet, source = workers
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = perturbed_state_dict(model, seed=3)
    published = ray.get(source.publish.remote(state, "object_store"))
    fleet.push_weights(published, fleet.version + 1)
    state.pop("model.norm.weight")
    partial = ray.get(source.publish.remote(state, "object_store"))
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        fleet.push_weights(partial, fleet.version + 1)
    assert_holds(fleet.pool.workers, model, fleet.version - 1)


@pytest.mark.parametrize("workers", ["tied"], indirect=True)  # the tied model's workers, reused
def test_learner_rank_publishes_its_weights_to_the_generators(workers, tmp_path):
    """A real one-rank FSDP2 learner starts from changed weights; after its all-rank
    gather, both transports bring exactly those weights to generators that started
    from the original model."""
    model_dir, fleet, _ = workers
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    perturbed_state_dict(model, seed=9)
    model.save_pretrained(tmp_path)
    cfg = load_config(None, ["rollout.weight_bucket_mb=0.0625", "learner.num_ranks=1"])
    learner = create_learner_group(cfg, str(tmp_path), actor_options=lambda r: {"num_cpus": 0.5})
    try:
        for transport in ("shared_memory", "object_store", "broadcast"):
            published = ray.get(learner.handles[0].publish_weights.remote(transport))
            assert published.transport == transport and len(published.buckets) > 1
            fleet.push_weights(published, fleet.version + 1)
            assert_holds(fleet.pool.workers, model, fleet.version)
        # A worker added after a broadcast catches up from an object-store copy; the
        # next broadcast forms a new group that includes it.
        fleet.scale_to(2, wait=True)
        assert_holds(fleet.pool.workers, model, fleet.version)
        fleet.push_weights(ray.get(learner.handles[0].publish_weights.remote("broadcast")), fleet.version + 1)
        assert_holds(fleet.pool.workers, model, fleet.version)
        # ... and from the shared-memory file (vLLM reads views of it)
        fleet.push_weights(ray.get(learner.handles[0].publish_weights.remote("shared_memory")), fleet.version + 1)
        assert_holds(fleet.pool.workers, model, fleet.version)
    finally:
        fleet.scale_to(1)
        ray.get(learner.handles[0].close_weights.remote())
        ray.kill(learner.handles[0])
