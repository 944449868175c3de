"""The elastic rollout fleet with real Ray actors: generation workers (tiny model, real
vLLM) added and removed between and during calls, the `python -m srpo_ray.scale`
request file, and stale rollouts being regenerated instead of used."""
from __future__ import annotations

import logging
import time

import pytest
import ray
import torch
from fixtures_models import perturbed_state_dict
from local_ray import ensure_local_ray
from published_weights import load_into
from ray.exceptions import RayActorError
from test_weight_sync import BUCKET_BYTES, assert_holds, generation_pool
from transformers import AutoModelForCausalLM

from srpo_ray import scale
from srpo_ray.records import Prompt, Sampling
from srpo_ray.runtime.fleets import RayRolloutFleet

SAMPLING = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)


def prompts(k: int) -> list[Prompt]:
    return [Prompt(f"p{i}", "math", [{"role": "user", "content": f"What is {i} + {i}?"}], str(2 * i))
            for i in range(k)]


def assert_complete(groups, asked: list[Prompt], version: int) -> None:
    assert [g.prompt.prompt_id for g in groups] == [p.prompt_id for p in asked]  # all, in order
    assert all(len(g.samples) == SAMPLING.n and g.policy_version == version for g in groups)


def is_dead(handle, within_s: float = 60.0) -> bool:
    """Whether the actor is gone (ray.kill takes effect asynchronously)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ping.remote(), timeout=within_s)
        except RayActorError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    """A one-worker fleet at version 1 (weights pushed through the object store), with
    a run dir for scale requests; (fleet, the model holding version 1's weights)."""
    from actors.learner import WeightSourceActor

    ensure_local_ray()
    fleet = RayRolloutFleet(generation_pool(tiny_model_dir, 1), control_dir=tmp_path_factory.mktemp("run"))
    fleet.pool.wait_ready()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    source = WeightSourceActor.options(num_cpus=0.1).remote("object_store", BUCKET_BYTES)
    fleet.push_weights(ray.get(source.publish.remote(perturbed_state_dict(model, seed=4))), 1)
    yield fleet, model
    for handle in fleet.pool.workers + [source]:
        ray.kill(handle)


def test_scale_up_between_calls_and_down_while_busy(fleet):
    fleet, model = fleet
    asked = prompts(6)
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(1)), asked, 1)

    fleet.scale_to(2)  # returns at once: the new worker starts in the background
    assert fleet.pool.target == 2
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(2)), asked, 1)  # served meanwhile, newcomer or not
    fleet.scale_to(2, wait=True)
    assert len(fleet.pool.ready()) == 2
    assert_holds(fleet.pool.workers, model, 1)  # the newcomer got the current weights before serving
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(3)), asked, 1)

    # Scale down while both workers hold a chunk: the retired one's chunk is not lost.
    pool, handles, submitted = fleet.pool, list(fleet.pool.workers), []

    def submit(member, index, chunk):
        submitted.append(member.index)
        if len(submitted) == 2:
            pool.scale_to(1)
            assert sum(m.draining for m in pool.members) == 1
        return member.handle.generate.remote(chunk, SAMPLING.with_seed(index), member.version)

    results = pool.map_chunks([[p] for p in asked], submit)
    assert [g.prompt.prompt_id for chunk in results for g in chunk] == [p.prompt_id for p in asked]
    assert sorted(submitted[:2]) == [0, 1] and len(submitted) == len(asked)
    assert [m.index for m in pool.members] == [0] and is_dead(handles[1])
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(4)), asked, 1)
    assert fleet.pop_metrics()["rollout/workers"] == 1


def test_scale_request_file_is_applied_once_at_the_next_generate(fleet, caplog):
    fleet, model = fleet
    run_dir = fleet.control_dir
    assert scale.main(["--run-dir", str(run_dir), "--rollout-workers", "2"]) == 0
    assert [p.name for p in run_dir.iterdir()] == [scale.REQUEST_FILE]  # no temporary file left
    asked = prompts(4)
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(5)), asked, 1)
    assert fleet.pool.target == 2
    fleet.scale_to(1)  # the driver's own call wins until a new request arrives (retires the newcomer)
    fleet.generate(asked, SAMPLING.with_seed(6))
    assert fleet.pool.target == 1

    (run_dir / scale.REQUEST_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="srpo_ray.runtime.fleets"):
        assert_complete(fleet.generate(asked, SAMPLING.with_seed(7)), asked, 1)
    assert "ignoring scale request" in caplog.text and fleet.pool.target == 1


def test_scale_command_line_refuses_bad_input(tmp_path, capsys):
    assert scale.main(["--run-dir", str(tmp_path / "nope"), "--rollout-workers", "2"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert scale.main(["--run-dir", str(tmp_path), "--rollout-workers", "0"]) == 2
    assert "must be a whole number >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_stale_rollouts_are_regenerated_not_used(fleet, tiny_model_dir):
    """A worker whose weights went back to version 0 behind the fleet's back: its
    rollouts are refused, it is re-synced, and the chunk comes back at version 1."""
    fleet, model = fleet
    fleet.pop_metrics()
    worker = fleet.pool.ready()[0].handle
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert load_into(worker, original, 0, bucket_bytes=BUCKET_BYTES) == 0
    asked = prompts(3)
    assert_complete(fleet.generate(asked, SAMPLING.with_seed(8)), asked, 1)
    assert fleet.pop_metrics()["rollout/stale_discarded"] >= 1
    assert_holds([worker], model, 1)


@ray.remote(num_cpus=0.1)
class Echo:
    """A stand-in worker: fails to start if told to; dies on the chunk "die" once."""

    def __init__(self, fail_start: bool, flag: str):
        if fail_start:
            raise RuntimeError("cannot start")
        self.flag = flag

    def ping(self) -> bool:
        return True

    def work(self, chunk: str) -> str:
        import os

        if chunk == "die" and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(1)
        return chunk.upper()


def test_pool_replaces_a_worker_that_fails_to_start_or_dies_mid_chunk(tmp_path):
    ensure_local_ray()
    from srpo_ray.runtime.worker_pool import WorkerPool

    created: list[int] = []

    def factory(index: int):
        created.append(index)
        return Echo.remote(fail_start=created.count(1) == 1 and index == 1, flag=str(tmp_path / "died"))

    pool = WorkerPool("echo", factory, 2)
    chunks = ["a", "die", "b", "c", "d"]
    results = pool.map_chunks(chunks, lambda m, i, chunk: m.handle.work.remote(chunk))
    assert results == [c.upper() for c in chunks]  # complete, in order, each once
    assert pool.replacements == 2 and len(pool.members) == 2 and created.count(1) >= 2
    for handle in pool.workers:
        ray.kill(handle)


def test_a_catch_up_whose_shared_memory_slot_was_taken_over_does_not_fail_the_call(fleet):
    """A late load of shared-memory weights that newer publishes have overwritten is
    refused by the worker (WeightsSupersededError, nothing loaded); the fleet forgets the
    worker's version and the call still returns the rollouts."""
    from actors.learner import WeightSourceActor

    fleet, model = fleet
    source = WeightSourceActor.options(num_cpus=0.1).remote("shared_memory", BUCKET_BYTES)
    try:
        state = model.state_dict()
        fleet.push_weights(ray.get(source.publish.remote(state)), fleet.version + 1)
        delivered = fleet._delivery
        for _ in range(2):  # both slots rewritten: the pushed version's bytes are gone
            ray.get(source.publish.remote(state))
        member = fleet.pool.ready()[0]
        member.version = None  # as if it were new: the next chunk catches up first
        fleet._delivery = delivered
        asked = prompts(2)
        assert_complete(fleet.generate(asked, SAMPLING.with_seed(11)), asked, fleet.version)
        assert_holds([member.handle], model, fleet.version)
    finally:
        ray.get(source.close_weights.remote())
        ray.kill(source)
