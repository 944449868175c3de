"""The elastic pool's work loop (srpo_ray/runtime/worker_pool.py) with fake workers and
Ray calls: a worker that stops answering is caught by its chunk's deadline, killed,
replaced, and the chunk re-issued; a slow worker within its deadline is left alone; a
dead one is replaced as before. And the deadlines a run derives from its config
(srpo_ray/runtime/deadlines.py)."""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest

from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.config.schema import SRPOConfig
from srpo_ray.runtime.deadlines import generation_chunk_seconds, reward_chunk_seconds
from srpo_ray.runtime.worker_pool import MAX_REPLACEMENTS_PER_CALL, WorkerPool

NEVER = math.inf
WAIT_GUARD_S = 20.0  # a wait without a timeout that nothing answers would block forever


class RayActorError(Exception):
    """Ray's dead-actor error, as the pool recognises it (worker_pool.is_lost_worker)."""


class EngineDeadError(Exception):
    """vLLM's dead engine: the actor still answers, its engine never will."""


RayActorError.__module__ = "ray.exceptions"
EngineDeadError.__module__ = "vllm.v1.engine.exceptions"


class Ref:
    """A call's result, ready once its worker has answered (`ready_at`, monotonic time)."""

    def __init__(self, value: Any = None, ready_at: float = 0.0, error: BaseException | None = None):
        self.value, self.ready_at, self.error = value, ready_at, error

    def ready(self) -> bool:
        return time.monotonic() >= self.ready_at


class FakeOps:
    def __init__(self) -> None:
        self.killed: list[Worker] = []
        self.timeouts: list[float | None] = []

    def get(self, ref: Ref, timeout: float | None = None) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def wait(self, refs: list[Ref], num_returns: int, timeout: float | None, fetch_local: bool = True) -> tuple:
        self.timeouts.append(timeout)
        end = time.monotonic() + (WAIT_GUARD_S if timeout is None else timeout)
        while True:
            ready = [r for r in refs if r.ready()][:num_returns]
            if ready:
                return ready, [r for r in refs if r not in ready]
            if time.monotonic() >= end:
                assert timeout is not None, "the pool waited without a deadline on a worker that never answers"
                return [], refs
            time.sleep(0.005)

    def kill(self, handle: "Worker") -> None:
        handle.killed = True
        self.killed.append(handle)


class Worker:
    """Doubles each item of a chunk, taking `seconds_per_item`; `hangs`: never answers
    (a stopped process); `dies`: its call fails as a dead actor's."""

    def __init__(self, index: int, served: list, seconds_per_item: float = 0.0, hangs: bool = False,
                 dies: bool = False, engine_dies: bool = False) -> None:
        self.index, self.served = index, served
        self.seconds_per_item, self.hangs, self.dies, self.engine_dies = seconds_per_item, hangs, dies, engine_dies
        self.killed = False
        self.ping = _Method(lambda: Ref(True))
        self.work = _Method(self._work)

    def _work(self, chunk: list[int]) -> Ref:
        self.served.append((self.index, list(chunk)))
        if self.dies:
            return Ref(error=RayActorError(f"worker {self.index} died"))
        if self.engine_dies:
            return Ref(error=EngineDeadError("EngineCore died"))
        ready_at = NEVER if self.hangs else time.monotonic() + self.seconds_per_item * len(chunk)
        return Ref([2 * x for x in chunk], ready_at=ready_at)


class _Method:
    def __init__(self, fn) -> None:
        self.remote = fn


def make_pool(size: int, chunk_seconds=None, **first_worker: Any) -> tuple[WorkerPool, FakeOps, list[Worker], list]:
    """A pool whose first worker created behaves as `first_worker` says, the rest normally."""
    ops, workers, served = FakeOps(), [], []

    def factory(i: int) -> Worker:
        workers.append(Worker(i, served, **(first_worker if not workers else {})))
        return workers[-1]

    return WorkerPool("reward", factory, size, chunk_seconds=chunk_seconds, ops=ops), ops, workers, served


def run(pool: WorkerPool, chunks: list[list[int]], **kwargs: Any) -> list[Any]:
    return pool.map_chunks(chunks, lambda m, i, chunk: m.handle.work.remote(chunk), **kwargs)


def test_a_hung_worker_is_killed_replaced_and_its_chunk_reissued(caplog):
    pool, ops, workers, served = make_pool(2, chunk_seconds=lambda chunk: 0.3, hangs=True)
    with caplog.at_level(logging.WARNING, logger="srpo_ray.runtime.worker_pool"):
        start = time.monotonic()
        assert run(pool, [[1], [2], [3], [4]]) == [[2], [4], [6], [8]]
    assert time.monotonic() - start < 10
    assert ops.killed == [workers[0]] and pool.replacements == 1
    assert len(workers) == 3 and [w.index for w in pool.workers] == [1, 0]  # slot 0 reused by the replacement
    chunks_served = [chunk for _, chunk in served]
    assert served[0] == (0, [1]) and chunks_served.count([1]) == 2  # chunk 0 once more, elsewhere
    assert sorted(chunks_served) == [[1], [1], [2], [3], [4]]  # the others once each
    [message] = [r.getMessage() for r in caplog.records]
    assert "reward worker 0 hung" in message and "chunk 0 (1 items) in 0.3 s" in message


def test_a_slow_worker_within_its_chunks_deadlines_is_left_alone():
    """Each chunk's deadline is counted from its own submission and grows with it: one
    worker serving three chunks one after another takes longer than any one deadline."""
    asked = []

    def chunk_seconds(chunk: list[int]) -> float:
        asked.append(list(chunk))
        return 0.5 * len(chunk)

    pool, ops, workers, _ = make_pool(1, chunk_seconds=chunk_seconds, seconds_per_item=0.1)
    chunks = [[1], [2, 3, 4], [5]]
    assert run(pool, chunks) == [[2], [4, 6, 8], [10]]
    assert ops.killed == [] and pool.replacements == 0 and asked == chunks


def test_without_a_deadline_the_pool_waits_for_an_answer_as_long_as_it_takes():
    pool, ops, _, _ = make_pool(1, seconds_per_item=0.05)
    assert run(pool, [[1], [2]]) == [[2], [4]]
    assert set(ops.timeouts[1:]) == {None}  # (the first: the start-up poll)


def test_a_call_can_set_its_own_deadline():
    pool, ops, workers, _ = make_pool(1, chunk_seconds=lambda chunk: 3600.0, hangs=True)
    assert run(pool, [[1]], chunk_seconds=lambda chunk: 0.2) == [[2]]
    assert ops.killed == [workers[0]]


def test_workers_that_keep_hanging_stop_the_call_instead_of_looping():
    ops, served = FakeOps(), []
    pool = WorkerPool("generation", lambda i: Worker(i, served, hangs=True), 1, chunk_seconds=lambda c: 0.05,
                      ops=ops)
    with pytest.raises(RuntimeError, match="generation workers keep dying"):
        run(pool, [[1]])
    assert len(ops.killed) == MAX_REPLACEMENTS_PER_CALL + 1


def test_a_dead_worker_is_replaced_and_its_chunk_reissued():
    pool, ops, workers, served = make_pool(1, chunk_seconds=lambda chunk: 60.0, dies=True)
    assert run(pool, [[1], [2]]) == [[2], [4]]
    assert pool.replacements == 1 and ops.killed == []  # dead already: nothing to kill
    assert [index for index, _ in served] == [0, 0, 0]  # the replacement took slot 0



def test_a_worker_whose_engine_died_is_killed_and_replaced():
    pool, ops, workers, _ = make_pool(1, engine_dies=True)
    assert run(pool, [[1], [2]]) == [[2], [4]]
    assert pool.replacements == 1 and ops.killed == [workers[0]]  # alive, but useless: it holds its resources

# ----------------------------------------------------------------------------- deadlines from the config

def test_the_configured_deadlines_start_at_minutes_and_grow_with_the_chunk():
    cfg = SRPOConfig()  # the schema's defaults: no stage overrides n or max_new_tokens
    generation, reward = generation_chunk_seconds(cfg), reward_chunk_seconds(cfg)
    assert generation([]) >= 300 and reward([]) >= 120  # a slow call on a loaded host is no hang
    samples = max(cfg.rollout.n, cfg.eval.k)
    assert generation([1, 2]) - generation([1]) == pytest.approx(
        cfg.rollout.hung_after_s_per_token * samples * cfg.rollout.max_new_tokens)
    # null: each response as long as the slowest check may run, plus grace
    per_response = max(cfg.reward.math_timeout_s, cfg.reward.code_total_timeout_s, cfg.reward.custom_timeout_s)
    assert reward([1, 2]) - reward([1]) >= per_response * samples


def test_a_stage_that_samples_more_gets_more_time_and_0_turns_the_deadline_off():
    base = load_config()
    more = load_config(overrides=["stages.1.n=32", "stages.1.max_new_tokens=512", "reward.hung_after_s_per_response=1"])
    assert generation_chunk_seconds(more)([1]) - more.rollout.hung_after_s == pytest.approx(
        more.rollout.hung_after_s_per_token * 32 * 512)
    assert reward_chunk_seconds(more)([1]) == more.reward.hung_after_s + 32 * 1.0
    assert generation_chunk_seconds(more)([1]) > generation_chunk_seconds(base)([1])
    off = load_config(overrides=["rollout.hung_after_s=0", "reward.hung_after_s=0"])
    assert generation_chunk_seconds(off) is None and reward_chunk_seconds(off) is None


@pytest.mark.parametrize("key", ["rollout.hung_after_s", "rollout.hung_after_s_per_token", "reward.hung_after_s",
                                 "reward.hung_after_s_per_response"])
def test_a_negative_deadline_is_a_config_error_naming_the_key(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"{key}=-1"])
