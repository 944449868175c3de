"""A receiver dying mid-update, with fakes as honest as NCCL (#1): once rank 0 aborts, no
receiver of that group completes; the fleet must wait for the replacements and send the
same publish again, or the retry delivers to nobody and the push passes with no worker
holding the version. And which errors mean a worker is lost for good (#4): Ray's dead
actor and vLLM's dead engine, also when Ray wraps the latter."""
from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from srpo_ray.runtime.worker_pool import is_lost_worker
from srpo_ray.weights.transport import PublishedWeights, WeightDeliveryError


class NcclWorld:
    """One group send: a receiver that dies aborts rank 0's send, and then every other
    receiver of the group is stuck (it never completes); the host copy of the publish
    is whole only after a send that reached every receiver."""

    def __init__(self, dying: set[str]):
        self.dying, self.rounds, self.complete_publish = dying, [], None

    def deliver(self, members, version):
        names = [m.handle for m in members]
        self.rounds.append(names)
        if any(n in self.dying for n in names):
            self.dying -= set(names)
            return [RayActorError() if n.startswith("dead") else WeightDeliveryError("stuck: rank 0 aborted")
                    for n in names]
        if members:
            self.complete_publish = 1
        return [version] * len(members)


class Pool:
    """A pool whose replacements start in the background (ready only after wait_ready)."""

    def __init__(self, names):
        self.members = [type("M", (), {"handle": n, "index": i, "asleep": ()})() for i, n in enumerate(names)]
        self.starting, self.next = [], len(names)

    def poll(self):
        pass

    def ready(self):
        return list(self.members)

    def lost(self, m, error=None):
        self.members.remove(m)
        self.starting.append(type("M", (), {"handle": f"new{self.next}", "index": self.next, "asleep": ()})())
        self.next += 1

    def wait_ready(self, timeout_s=None):
        self.members += self.starting
        self.starting = []


def test_a_push_after_a_dead_receiver_reaches_the_replacements(monkeypatch):
    import srpo_ray.runtime.fleets as fleets

    world, pool = NcclWorld({"dead0"}), Pool(["dead0", "alive1"])
    ops = type("Ops", (), {"kill": lambda self, h: None})()
    fleet = fleets.RayRolloutFleet(pool, ops=ops)
    monkeypatch.setattr(fleet, "_delivery_for", lambda w: world)
    monkeypatch.setattr(fleet, "_load_seconds", lambda members: [])
    fleet.push_weights(PublishedWeights("nccl", [], publish_id=1), 4)
    assert world.rounds == [["dead0", "alive1"], ["new2", "new3"]]  # the same publish, to the replacements
    assert world.complete_publish == 1
    assert all(m.version == 4 for m in pool.members)


def test_a_push_with_no_worker_left_does_not_pass(monkeypatch):
    import srpo_ray.runtime.fleets as fleets

    pool = Pool([])
    fleet = fleets.RayRolloutFleet(pool, ops=type("Ops", (), {"kill": lambda self, h: None})())
    monkeypatch.setattr(fleet, "_delivery_for", lambda w: NcclWorld(set()))
    with pytest.raises(RuntimeError, match="no generation worker"):
        fleet.push_weights(PublishedWeights("nccl", [], publish_id=1), 4)


def test_a_dead_engine_is_a_lost_worker_as_a_dead_actor_is():
    from vllm.v1.engine.exceptions import EngineDeadError

    assert EngineDeadError.__module__ == "vllm.v1.engine.exceptions"
    try:
        raise EngineDeadError()
    except EngineDeadError as e:
        wrapped = RayTaskError("generate", "Traceback ...", e).as_instanceof_cause()  # what ray.get raises
    assert is_lost_worker(EngineDeadError()) and is_lost_worker(wrapped)
    assert is_lost_worker(RayTaskError("generate", "Traceback ...", EngineDeadError()))  # unwrapped: .cause
    assert is_lost_worker(RayActorError()) and is_lost_worker(ActorDiedError())
    assert not is_lost_worker(RayTaskError("generate", "Traceback ...", ValueError("bad prompt")))
    assert not is_lost_worker(WeightDeliveryError("stuck"))


def test_a_fleet_with_stale_rollouts_has_catch_up_copies_made_at_each_push():
    import srpo_ray.runtime.fleets as fleets

    for staleness, prepare in ((0, False), (1, True)):
        fleet = fleets.RayRolloutFleet(pool=None, max_staleness=staleness, ops=object())
        assert fleet._delivery_for(PublishedWeights("nccl", [])).transport.prepare_catch_up is prepare
