"""The GPU weight paths' checks that need vLLM's own classes or Ray's errors and fleets
(issue #10): the vllm_packed rule against the installed vLLM's packer, our requests
against its weight-transfer dataclasses, a dead NCCL receiver, stuck workers replaced,
each worker's last load reported. (The rest: tests/unit/test_weights_gpu_paths.py.)"""
from __future__ import annotations

import pytest
import torch
from weight_fakes import MB, Handle, Member, Ref, RefOps, qwen32b_specs

from srpo_ray.weights.cuda_ipc import check_back_to_back, chunk_update_info
from srpo_ray.weights.layout import plan_stream
from srpo_ray.weights.nccl import NcclDetail, NcclTransport, TransferAborted, update_info, worker_init_info
from srpo_ray.weights.source import StateDictSource
from srpo_ray.weights.transport import PublishedWeights, WeightDeliveryError


@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")
def test_vllm_packed_chunks_match_vllms_own_packer():
    packed_tensor = pytest.importorskip("vllm.distributed.weight_transfer.packed_tensor")
    torch.manual_seed(0)
    state = {f"t{i}": torch.randn(int(n)).to(dt) for i, (n, dt) in enumerate(
        zip(torch.randint(1, 700, (40,)), [torch.bfloat16, torch.float32] * 20))}
    state["bf"] = torch.randn(3000).bfloat16()  # larger than a bucket
    budget = 1000
    ours = [[s.name for s in b.slots] for b in plan_stream(StateDictSource(state).specs, budget, "vllm_packed")]
    it, theirs = iter(state.items()), []
    while (chunk := packed_tensor.pack_tensors(it, lambda item: item[1], budget)) is not None:
        theirs.append(chunk.names)
    assert ours == theirs
    check_back_to_back(plan_stream(StateDictSource(state).specs, budget, "vllm_packed"))
    with pytest.raises(ValueError, match="rule vllm_packed"):
        check_back_to_back(plan_stream(StateDictSource(state).specs, budget, "fit"))


def test_our_requests_are_what_vllms_weight_transfer_engines_accept():
    nccl_common = pytest.importorskip("vllm.distributed.weight_transfer.nccl_common")
    nccl_engine = pytest.importorskip("vllm.distributed.weight_transfer.nccl_engine")
    ipc_engine = pytest.importorskip("vllm.distributed.weight_transfer.ipc_engine")
    specs = qwen32b_specs()[:30]
    buckets = plan_stream(specs, 64 * MB, "vllm_packed")
    init = nccl_common.NCCLWeightTransferInitInfo(**worker_init_info(("10.0.0.1", 29500), 5, 33, 64 * MB))
    assert (init.rank_offset, init.world_size, init.packed, init.packed_buffer_size_bytes) == (5, 33, True, 64 * MB)
    info = nccl_engine.NCCLWeightTransferUpdateInfo(**update_info(buckets))
    assert info.names == [s.name for s in specs] and info.dtype_names[0] == "bfloat16"
    chunk = ipc_engine.IPCWeightTransferUpdateInfo(**chunk_update_info(buckets[0], {"GPU-x": (0,) * 8}))
    assert sum(chunk.tensor_sizes) == buckets[0].nbytes
    ipc_engine.IPCWeightTransferInitInfo(packed=True)


def test_a_dead_nccl_receiver_aborts_the_send_and_the_stuck_ones_are_replaced(monkeypatch):
    from ray.exceptions import RayActorError

    import srpo_ray.weights.common as common

    ops = RefOps()
    send = Ref(ready=False)
    stuck, also_stuck = Ref(ready=False), Ref(ready=False)  # once rank 0 aborts, no receiver completes

    class Store:
        def set(self, key, value):  # rank 0 sees the key, aborts, keeps gathering, fails
            assert key.startswith("abort/")
            send.error, send.ready = TransferAborted("weight bucket 3: aborted (a receiver is gone)"), True
    monkeypatch.setattr(common, "open_store", lambda *a, **k: Store())
    t = NcclTransport(ops)
    members = [Member(Ref(error=RayActorError())), Member(stuck), Member(also_stuck)]
    t._group_key = ("learner", tuple(members))  # a formed group: deliver goes straight to the send
    published = PublishedWeights("nccl", [], source="learner", sources=[Handle(send)], publish_id=1,
                                 detail=NcclDetail(("h", 1), 1, MB), timeout_s=30)
    out = t.deliver(published, members, 3)
    assert isinstance(out[0], RayActorError)
    assert all(isinstance(o, WeightDeliveryError) and "aborted" in str(o) for o in out[1:])
    assert t._group_key == ()  # the next delivery forms a new group


def test_the_fleet_replaces_stuck_workers_and_sends_again(monkeypatch):
    """RayRolloutFleet.push_weights: WeightDeliveryError members are killed and lost."""
    import srpo_ray.runtime.fleets as fleets

    killed, lost = [], []
    rounds = iter([[WeightDeliveryError("stuck"), 7], [7]])

    class Pool:
        members = []

        def poll(self):
            pass

        def ready(self):
            return [type("M", (), {"handle": f"h{i}", "index": i})() for i in range(2 if not lost else 1)]

        def lost(self, m, error=None):
            lost.append(m.index)

        def wait_ready(self, timeout_s=None):  # the fleet waits for replacements before sending again
            pass

    class Delivery:
        def deliver(self, members, version):
            return next(rounds)
    class Ops:  # the fleet's Ray calls: a kill is recorded
        def kill(self, handle):
            killed.append(handle)

    fleet = fleets.RayRolloutFleet(Pool(), ops=Ops())
    monkeypatch.setattr(fleet, "_delivery_for", lambda w: Delivery())
    asked = []  # load times are asked once, of the members that took the weights
    monkeypatch.setattr(fleet, "_load_seconds", lambda members: asked.append([m.handle for m in members]) or [])
    fleet.push_weights(PublishedWeights("object_store", []), 7)
    assert killed == ["h0"] and lost == [0]
    assert asked == [["h0"]]  # the one worker the second round's pool still holds


def test_a_push_reports_each_workers_last_load():
    """A worker that joined between pushes also timed its catch-up load: only the load of
    the push just finished counts; a worker that died has none."""
    from ray.exceptions import RayActorError

    import srpo_ray.runtime.fleets as fleets

    class Handle:
        def __init__(self, answer):
            self.pop_load_seconds = type("Method", (), {"remote": staticmethod(lambda: answer)})()

    class Ops:  # the answers stand for their refs; an error is raised, as ray.get does
        def get(self, ref, timeout=None):
            if isinstance(ref, BaseException):
                raise ref
            return ref

    members = [type("M", (), {"handle": Handle(a)})() for a in ([5.0, 0.8], [0.9], [], RayActorError())]
    assert fleets.RayRolloutFleet(pool=None, ops=Ops())._load_seconds(members) == [0.8, 0.9]
