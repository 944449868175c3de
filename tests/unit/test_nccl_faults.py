"""The nccl transport's deadlines, checked with fakes that behave as Ray and NCCL do (a
wait returns when `num_returns` refs are ready or its timeout passes; a rank-0 open
blocks until every rank joined): forming a group that a worker never joins ends in a
bounded time, names the worker, and drops the half-formed group (#2); rank 0 waits on a
bucket well under the collective timeout the other learner ranks sit under (#5)."""
from __future__ import annotations

import threading
import time

import pytest
from weight_fakes import MB

from srpo_ray.weights.nccl import (
    NcclDetail,
    NcclTransport,
    join_limit_s,
    open_with_deadline,
    stall_limit_s,
)
from srpo_ray.weights.transport import PublishedWeights, WeightDeliveryError


class Ref:
    def __init__(self, value=None, error=None, ready=True):
        self.value, self.error, self.ready = value, error, ready


class HonestOps:
    """Ray's wait: blocks until num_returns refs are ready or the timeout passes."""

    def __init__(self):
        self.waited: list[float | None] = []

    def get(self, ref, timeout=None):
        if not ref.ready:
            raise AssertionError("a get on a ref that never completes would block for good")
        if ref.error:
            raise ref.error
        return ref.value

    def wait(self, refs, num_returns, timeout, fetch_local=True):
        self.waited.append(timeout)
        ready = [r for r in refs if r.ready]
        if len(ready) < num_returns and timeout:
            time.sleep(min(timeout, 0.05))  # nothing becomes ready meanwhile in these fakes
        return ready[:num_returns], [r for r in refs if r not in ready[:num_returns]]


class Worker:
    def __init__(self, index: int, join: Ref):
        self.index = index
        self.handle = type("H", (), {"weights_call": type("C", (), {"remote": staticmethod(lambda *a: join)})()})()


def test_a_group_a_worker_never_joins_ends_in_time_and_names_it():
    source = type("S", (), {})()
    opened = Ref(ready=False)  # rank 0 waits in NCCL's init for the missing rank
    source.weights_call = type("C", (), {"remote": staticmethod(
        lambda t, op, *a: Ref(value=("10.0.0.1", 29500)) if op == "endpoint" else opened)})()
    members = [Worker(3, Ref(error=RuntimeError("engine died\nEngineDeadError: gone"))), Worker(5, Ref(ready=False))]
    published = PublishedWeights("nccl", [], source=source, publish_id=1, timeout_s=0.4,
                                 detail=NcclDetail(("h", 1), 1, MB))
    ops = HonestOps()
    t = NcclTransport(ops)
    out = t.deliver(published, members, 2)
    assert all(w is not None for w in ops.waited), "a wait without a deadline"
    assert isinstance(out[0], RuntimeError) and "engine died" in str(out[0])
    assert isinstance(out[1], WeightDeliveryError) and "generation worker 3" in str(out[1])
    assert t._group_key == ()  # the next delivery forms a new group
    silent = t.deliver(published, [Worker(7, Ref(value=None)), Worker(8, Ref(ready=False))], 2)
    assert all("generation worker 8 did not join" in str(o) for o in silent)


def test_rank_0_gives_up_an_open_and_drops_the_group_if_it_forms_late():
    release, destroyed = threading.Event(), []

    class Comm:
        def destroy(self):
            destroyed.append(True)

    def slow_open():
        release.wait(5)
        return Comm()

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not every rank joined"):
        open_with_deadline(slow_open, 0.1, "group")
    assert time.monotonic() - start < 1
    release.set()
    for _ in range(100):
        if destroyed:
            break
        time.sleep(0.01)
    assert destroyed == [True], "the late group was left open"
    assert isinstance(open_with_deadline(Comm, 1, "group"), Comm)


def test_rank_0_waits_on_a_bucket_well_under_the_collective_timeout():
    """Meanwhile the other ranks sit in the next all-gather under NCCL's watchdog (the
    same learner.collective_timeout_s): rank 0 must give up and join it before then."""
    for collective in (60.0, 600.0, 1800.0):
        assert stall_limit_s(collective) <= collective / 4
        assert join_limit_s(collective) <= collective / 4
