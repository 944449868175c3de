"""The shared_memory weight transport (srpo_ray/weights/shared_memory.py).

Pure file mechanics first (versions, overwrite refusal, /dev/shm room, cleanup after
a SIGKILL); then real Ray generation workers, with an engine that keeps a copy of
every tensor it is given, so delivery is checked bit for bit. The same transport into
real vLLM engines is tested in test_weight_sync.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import ray
import torch
from local_ray import REPO, ensure_local_ray

from actors.generation import GenerationWorkerImpl
from actors.learner import WeightSourceActor
from srpo_ray.config.schema import RolloutConfig
from srpo_ray.runtime.fleets import RayRolloutFleet, WorkerPool
from srpo_ray.weights.layout import plan_buckets
from srpo_ray.weights.shared_memory import (
    SharedMemoryError,
    SharedWeightBuffer,
    SharedWeightReader,
    WeightsSupersededError,
    check_shm_space,
    remove_stale_files,
)

BUCKET_BYTES = 4 << 10


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(64, 32, generator=g)
    return {"model.embed_tokens.weight": emb, "layer.w": torch.randn(33, 17, generator=g),
            "layer.half": torch.randn(7, 5, generator=g).bfloat16(), "steps": torch.arange(5) + seed,
            "big": torch.randn(3000, generator=g), "lm_head.weight": emb}


def read_all(reader: SharedWeightReader, ref, buckets) -> dict[str, torch.Tensor]:
    with reader.reading(ref, buckets) as stream:
        return {name: t.clone() for name, t in stream}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# ----------------------------------------------------------------------------- pure

def test_versions_alternate_slots_and_an_overwritten_one_is_refused():
    buffer, reader = SharedWeightBuffer("node", timeout_s=5), SharedWeightReader()
    try:
        refs = []
        for seed in (1, 2, 3):
            state = random_state(seed)
            buckets = plan_buckets(state, BUCKET_BYTES)
            refs.append(buffer.write(state, buckets))
            assert_same(read_all(reader, refs[-1], buckets), state)
        assert [r.slot for r in refs] == [1, 0, 1] and len({r.path for r in refs}) == 1
        assert_same(read_all(reader, refs[1], buckets), random_state(2))  # one back: still there
        with pytest.raises(WeightsSupersededError, match="holds publish 3, this load asked for 1"):
            read_all(reader, refs[0], buckets)
    finally:
        buffer.close()
    assert not os.path.exists(refs[0].path)  # close removes the file


def test_a_slot_being_read_is_not_overwritten():
    """A reader in another process holds version 1: version 3 (same slot) waits for it
    and, past the timeout, fails instead of overwriting."""
    buffer = SharedWeightBuffer("node", timeout_s=0.5)
    state = random_state(0)
    buckets = plan_buckets(state, BUCKET_BYTES)
    try:
        ref = buffer.write(state, buckets)
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.lockf(fd, fcntl.LOCK_SH, 1, int(sys.argv[2])); print('held', flush=True); time.sleep(30)"),
            ref.path, str(ref.slot)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            buffer.write(state, buckets)  # the other slot: free
            with pytest.raises(SharedMemoryError, match="still reads weight publish 1"):
                buffer.write(state, buckets)
        finally:
            holder.kill()
            holder.wait()
        buffer.write(state, buckets)  # the reader is gone: its lock went with it
    finally:
        buffer.close()


def test_too_little_shared_memory_is_refused_naming_the_setting(monkeypatch):
    with pytest.raises(SharedMemoryError, match="rollout.weight_transport=object_store"):
        check_shm_space("/dev/shm", 1 << 60)  # the real /dev/shm has no exabyte

    class Tiny:
        f_bavail, f_frsize = 1, 4096
    monkeypatch.setattr("srpo_ray.weights.shared_memory.os.statvfs", lambda path: Tiny)
    buffer = SharedWeightBuffer("node")
    state = random_state(0)
    with pytest.raises(SharedMemoryError, match=r"needs [\d.]+ MiB in /dev/shm, only 0.0 MiB free.*--shm-size"):
        buffer.write(state, plan_buckets(state, BUCKET_BYTES))
    assert buffer.path is None


def test_a_killed_publishers_file_is_removed_by_the_next_publisher():
    script = ("import time, torch;"
              "from srpo_ray.weights.shared_memory import SharedWeightBuffer; from srpo_ray.weights.layout import plan_buckets;"
              "s = {'w': torch.ones(1000)}; b = SharedWeightBuffer('n'); b.write(s, plan_buckets(s, 4096)); b.wait();"
              "print(b.path, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    path = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.exists(path)  # SIGKILL runs no cleanup
    assert os.path.basename(path) in remove_stale_files()  # what every new SharedWeightBuffer does first
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- real Ray workers

# Workers cannot import tests/ modules: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

class KeepCopies:
    """Stand-in engine: keeps a copy of every tensor it is given (to compare bit for bit)."""

    max_model_len = 64

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}

    def load_weight_stream(self, names, weights) -> None:
        self.params = {name: tensor.clone() for name, tensor in weights}


@ray.remote
class CopyingWorker(GenerationWorkerImpl):
    def __init__(self, model_dir: str, index: int):
        super().__init__(model_dir, RolloutConfig(), "float32", 32, index, engine=KeepCopies())

    def params(self) -> dict[str, torch.Tensor]:
        return self.engine.params


def test_workers_and_a_late_joiner_get_bit_identical_weights(tiny_model_dir):  # noqa: F811
    ensure_local_ray()
    pool = WorkerPool("generation", lambda i: CopyingWorker.options(num_cpus=0.25).remote(tiny_model_dir, i), 2)
    source = WeightSourceActor.options(num_cpus=0.1).remote("shared_memory", BUCKET_BYTES)
    fleet = RayRolloutFleet(pool)
    try:
        pool.wait_ready()
        for version in (1, 2, 3):  # both slots, then the first again
            state = random_state(version)
            published = ray.get(source.publish.remote(state))
            assert published.transport == "shared_memory" and len(published.buckets) > 2
            assert os.path.exists(published.detail.path)
            fleet.push_weights(published, version)
            for handle in pool.workers:
                assert ray.get(handle.version.remote()) == version
                assert_same(ray.get(handle.params.remote()), state)
        fleet.scale_to(3, wait=True)  # the newcomer catches up from the same file
        assert [ray.get(h.version.remote()) for h in pool.workers] == [3, 3, 3]
        assert_same(ray.get(pool.workers[2].params.remote()), state)
        # an object-store copy (what a generator on another node loads) holds the same bytes
        copy = ray.get(source.weights_call.remote("shared_memory", "catch_up"))
        assert ray.get(pool.workers[0].weights_call.remote("object_store", "load", copy, 3)) == 3
        assert_same(ray.get(pool.workers[0].params.remote()), state)
    finally:
        ray.get(source.close_weights.remote())
        for handle in pool.workers + [source]:
            ray.kill(handle)
    assert not os.path.exists(published.detail.path)


class SleepyEngine(KeepCopies):
    """Stand-in engine with vLLM's sleep tags: refuses to sample or load while the
    memory it needs is asleep, and logs every call."""

    def __init__(self):
        super().__init__()
        self.asleep: set[str] = set()
        self.calls: list[str] = []

    def sleep(self) -> None:
        self.asleep = {"weights", "kv_cache"}
        self.calls.append("sleep")

    def wake_up(self, tags=None) -> bool:
        self.asleep -= set(tags or ("weights", "kv_cache"))
        self.calls.append(f"wake {sorted(tags or [])}")
        return not self.asleep

    def load_weight_stream(self, names, weights) -> None:
        assert "weights" not in self.asleep, "loaded into released weight memory"
        self.calls.append("load")
        super().load_weight_stream(names, weights)

    def generate(self, prompt_token_ids, sampling):
        from srpo_ray.records import Sample

        assert not self.asleep, f"sampled with {self.asleep} asleep"
        self.calls.append("generate")
        return [[Sample([1], [-0.5], "x", "length") for _ in range(sampling.n)] for _ in prompt_token_ids]


@ray.remote
class SleepyWorker(GenerationWorkerImpl):
    def __init__(self, model_dir: str, index: int):
        super().__init__(model_dir, RolloutConfig(), "float32", 32, index, engine=SleepyEngine())

    def calls(self) -> list[str]:
        return self.engine.calls


def test_colocated_generators_sleep_after_sampling_and_wake_for_update_then_sampling(tiny_model_dir):  # noqa: F811
    """The fleet's sleep/wake sequence around a training step (what vLLM's sleep mode gets
    on GPUs): generate, sleep, wake weights, load, wake KV cache, generate, sleep."""
    from srpo_ray.records import Prompt, Sampling

    ensure_local_ray()
    pool = WorkerPool("generation", lambda i: SleepyWorker.options(num_cpus=0.25).remote(tiny_model_dir, i), 1)
    source = WeightSourceActor.options(num_cpus=0.1).remote("object_store", BUCKET_BYTES)
    fleet = RayRolloutFleet(pool, sleep=True)
    prompts = [Prompt("p", "math", [{"role": "user", "content": "1 + 1?"}], "2")]
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    try:
        fleet.generate(prompts, sampling.with_seed(0))
        fleet.push_weights(ray.get(source.publish.remote(random_state(1))), 1)
        assert fleet.generate(prompts, sampling.with_seed(1))[0].policy_version == 1
        fleet.generate(prompts, sampling.with_seed(2))  # no update in between: wakes everything
        assert ray.get(pool.workers[0].calls.remote()) == [
            "generate", "sleep", "wake ['weights']", "load", "wake ['kv_cache']", "generate", "sleep",
            "wake ['kv_cache', 'weights']", "generate", "sleep"]
    finally:
        for handle in pool.workers + [source]:
            ray.kill(handle)
