"""Catch-up copies of the GPU transports (#7): nothing is copied per send; a late joiner's
copy is gathered on demand from the live model, one host bucket at a time, only while
the model still holds the published weights, and asked of every learner rank (the gather
is a collective) under the one lock that orders the driver's learner calls."""
from __future__ import annotations

import pytest
import torch

from srpo_ray.weights import common
from srpo_ray.weights.cuda_ipc import CudaIpcTransport
from srpo_ray.weights.layout import tensor_from_buffer, unpack_parts
from srpo_ray.weights.nccl import NcclTransport
from srpo_ray.weights.source import ModelSource
from srpo_ray.weights.transport import PublishedWeights, SenderSettings, WeightsSupersededError


class Ops:
    def __init__(self):
        self.puts = []

    def put(self, value):  # Ray copies into the object store: the staging bucket is reused
        self.puts.append([v.copy() for v in value])
        return len(self.puts) - 1

    def current_actor(self):
        return "rank0"

    def node_ip(self):
        return "127.0.0.1"


def unpacked(ops: Ops, record: PublishedWeights) -> dict[str, torch.Tensor]:
    out = {}
    for meta, ref in zip(record.buckets, record.detail):
        out.update(unpack_parts([tensor_from_buffer(p) for p in ops.puts[ref]], meta))
    return out


@pytest.mark.parametrize("kind", [NcclTransport, CudaIpcTransport])
def test_the_copy_is_gathered_when_asked_and_only_of_the_published_weights(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    ops = Ops()
    t = kind(ops, SenderSettings(ops, bucket_bytes=8 << 10))
    published = t.publish(ModelSource(model, torch.bfloat16, 0))
    assert not ops.puts  # nothing copied by the publish (nor by a send: no host copy exists)
    record = t.serve_catch_up(published.publish_id)  # before any send completed: the model is the version
    got = unpacked(ops, record)
    assert set(got) == set(model.state_dict())
    assert all(torch.equal(got[n], p.detach().bfloat16()) for n, p in model.state_dict().items())
    puts = len(ops.puts)
    assert t.serve_catch_up(published.publish_id) is record and len(ops.puts) == puts  # kept, not gathered again
    with pytest.raises(WeightsSupersededError):
        t.serve_catch_up(published.publish_id + 1)
    fresh = t.publish(ModelSource(model, torch.bfloat16, 0))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the learner trains: no longer the published version
    with pytest.raises(WeightsSupersededError, match="trained since"):
        t.serve_catch_up(fresh.publish_id)


def test_the_fleet_asks_every_rank_under_the_learner_lock_and_does_not_wait():
    calls = []

    class Rank:
        def __init__(self, name):
            self.weights_call = type("C", (), {"remote": staticmethod(
                lambda transport, op, *a: calls.append((name, op, a, common.LEARNER_CALLS._is_owned())) or
                f"ref-{name}")})()

    class Gen:
        weights_call = type("C", (), {"remote": staticmethod(lambda *a: calls.append(("gen",) + a) or "load")})()

    published = PublishedWeights("nccl", [], source=Rank("r0"), sources=[Rank("r0"), Rank("r1")], publish_id=3)
    fleet = common.GatheredCatchUp(ops=None, transport="nccl")  # no ops: it must not block on a get
    assert fleet.load(published, Gen(), 7) == "load"
    assert fleet.load(published, Gen(), 7) == "load"  # the same copy for the next late joiner
    assert calls[:2] == [("r0", "catch_up", (3,), True), ("r1", "catch_up", (3,), True)]
    assert calls[2] == ("gen", "object_store", "load", "ref-r0", 7) and len(calls) == 4


@pytest.mark.parametrize("prepare", [False, True])
def test_a_fleet_whose_rollouts_overlap_training_has_the_copy_made_at_each_push(prepare):
    """With rollout.max_staleness > 0 a replacement may need the copy while the learner
    trains, when the live model is no longer the version: it is asked right after the
    delivery, so every rank gathers it before its next step."""
    from weight_fakes import MB, Member, Ref, RefOps

    from srpo_ray.weights.nccl import NcclDetail

    asked = []

    class Rank:
        def __init__(self):
            self.weights_call = type("C", (), {"remote": staticmethod(
                lambda t, op, *a: asked.append(op) or Ref(value=None if op == "catch_up" else 0))})()

    t = NcclTransport(RefOps())
    t.prepare_catch_up = prepare
    members = [Member(Ref(value=3)), Member(Ref(value=3))]
    t._group_key = ("learner", tuple(members))  # a formed group: deliver goes straight to the send
    published = PublishedWeights("nccl", [], source="learner", sources=[Rank(), Rank()], publish_id=5,
                                 detail=NcclDetail(("h", 1), 1, MB), timeout_s=30)
    assert t.deliver(published, members, 3) == [3, 3]
    assert asked == ["send", "send"] + (["catch_up", "catch_up"] if prepare else [])
