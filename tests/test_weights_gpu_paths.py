"""What the GPU weight paths do that a CPU can check (issue #10, defects 2, 3, 4, 7):

- streaming planner: peak = two buckets, not the model; the vllm_packed rule cuts the
  stream exactly where vLLM's own packer does (the installed vLLM's pack_tensors);
- the records we hand vLLM's weight-transfer engines are accepted by its own dataclasses;
- the file fallback writes tied embeddings (safetensors.save_file refuses them);
- a dead NCCL receiver aborts the send, and the receivers left alive are reported stuck;
- cuda_ipc's fleet side merges every rank's handle per chunk, in order.
"""
from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open

from fixtures_models import tiny_tied_model_dir  # noqa: F401
from srpo_ray.weights.cuda_ipc import CudaIpcTransport, check_back_to_back, chunk_update_info
from srpo_ray.weights.layout import TensorSpec, distinct_slots, plan_stream, streaming_peak_bytes
from srpo_ray.weights.nccl import NcclDetail, NcclTransport, TransferAborted, update_info, wait_until, worker_init_info
from srpo_ray.weights.object_store import ObjectStoreTransport
from srpo_ray.weights.reload_file import FOLDER_PREFIX, ReloadFolder
from srpo_ray.weights.source import ModelSource, StateDictSource
from srpo_ray.weights.transport import PublishedWeights, SenderSettings, WeightDeliveryError

MB = 1 << 20


def qwen32b_specs() -> list[TensorSpec]:
    """The shapes of Qwen2.5-32B in bf16 (64 layers, hidden 5120, 152064 vocab)."""
    h, inter, kv, layers, vocab = 5120, 27648, 1024, 64, 152064
    specs = [TensorSpec("model.embed_tokens.weight", "bfloat16", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + n, "bfloat16", s) for n, s in (
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.q_proj.bias", (h,)),
            ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
            ("self_attn.o_proj.weight", (h, h)), ("mlp.gate_proj.weight", (inter, h)),
            ("mlp.up_proj.weight", (inter, h)), ("mlp.down_proj.weight", (h, inter)),
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)))]
    return specs + [TensorSpec("model.norm.weight", "bfloat16", (h,)), TensorSpec("lm_head.weight", "bfloat16",
                                                                                   (vocab, h))]


# ----------------------------------------------------------------------------- defect 4

def test_streaming_peak_is_two_buckets_not_the_model():
    specs = qwen32b_specs()
    model_bytes = sum(s.nbytes for s in specs)
    assert 60e9 < model_bytes < 70e9
    for rule in ("fit", "vllm_packed"):
        buckets = plan_stream(specs, 256 * MB, rule)
        peak = streaming_peak_bytes(buckets)
        biggest = max(s.nbytes for s in specs)  # the embedding travels alone (or nearly)
        assert peak == 2 * max(b.nbytes for b in buckets) <= 2 * (256 * MB + biggest)
        assert peak < model_bytes / 15
        assert [s.name for b in buckets for s in b.slots] == [s.name for s in specs]


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


class CountingSource:
    """A streamed source that records how many of its tensors are alive at once."""

    in_hand = False

    def __init__(self, n: int, size: int):
        self.specs = [TensorSpec(f"w{i}", "float32", (size,)) for i in range(n)]
        self.alive, self.peak = 0, 0

    def tensors(self):
        for i, spec in enumerate(self.specs):
            t = torch.full(spec.shape, float(i))
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            yield spec.name, t
            del t
            self.alive -= 1


class FakeOps:
    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append([v.copy() for v in value])
        return len(self.puts) - 1

    def current_actor(self):
        return "me"


def test_object_store_streams_a_gpu_learner_one_bucket_at_a_time():
    ops, source = FakeOps(), CountingSource(10, 256)  # 1 KiB tensors, 3 per 3 KiB bucket
    t = ObjectStoreTransport(ops, SenderSettings(ops, bucket_bytes=3 << 10))
    published = t.publish(source)
    assert source.peak == 1 and t._staging.numel() == max(b.nbytes for b in published.buckets)
    assert published.detail == list(range(len(published.buckets))) == list(range(4))
    got = [float(part.view("float32")[0]) for bucket in ops.puts for part in bucket]
    assert got == [float(i) for i in range(10)]


def test_model_source_casts_on_the_device_and_names_tied_weights():
    from transformers import AutoModelForCausalLM

    from srpo_ray.models import build_tiny_model

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(d, tie_word_embeddings=True))
    tied = ("model.embed_tokens.weight", "lm_head.weight")
    src = ModelSource(model, torch.bfloat16, 0, tied, send_tied=True)
    assert src.specs[-1] == TensorSpec("lm_head.weight", "bfloat16", src.specs[0].shape, alias_of=tied[0])
    state = src.state_dict()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert all(v.dtype == torch.bfloat16 for v in state.values() if v.is_floating_point())
    no_tied = ModelSource(model, torch.bfloat16, 0, tied, send_tied=False)  # nccl / cuda_ipc: vLLM re-ties
    assert "lm_head.weight" not in [s.name for s in no_tied.specs]


# ----------------------------------------------------------------------------- vLLM's own records

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


# ----------------------------------------------------------------------------- defects 2, 3, 11

def test_tied_embeddings_reach_a_multiprocess_engine_through_the_file(tmp_path):
    emb = torch.randn(64, 16).bfloat16()
    state = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(16), "lm_head.weight": emb}
    from safetensors.torch import save_file
    with pytest.raises(RuntimeError, match="share memory"):  # what the old path called
        save_file(state, str(tmp_path / "refused.safetensors"))
    folder = ReloadFolder(str(tmp_path))
    path = folder.write(iter(state.items()))
    assert path.startswith(str(tmp_path / FOLDER_PREFIX))
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(state)
        for name, t in state.items():
            assert torch.equal(f.get_tensor(name), t), name
    folder.close()
    assert not list(tmp_path.iterdir())


def test_the_engine_hands_tp_workers_a_file_not_a_gpu_state_dict(tmp_path, tiny_tied_model_dir):
    """VLLMEngine.load_weight_stream with worker processes (TP > 1): every name reaches
    the file (tied lm_head included), tensors are written from CPU buffers one by one."""
    from srpo_ray.generation.engines import VLLMEngine, _checkpoint_tensor_names

    calls = []

    class FakeLLM:
        def collective_rpc(self, method, kwargs):
            with safe_open(f"{kwargs['weights_path']}/model.safetensors", framework="pt") as f:
                calls.append((method, {k: f.get_tensor(k) for k in f.keys()}))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache", None))

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.model_path, engine.in_process, engine._llm = tiny_tied_model_dir, False, FakeLLM()
    files, tied = _checkpoint_tensor_names(tiny_tied_model_dir)
    engine._file_names, engine._expected_names = files, files | {"lm_head.weight"}
    engine._reload_folder = ReloadFolder(str(tmp_path))
    from transformers import AutoModelForCausalLM
    state = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir).state_dict()
    engine.load_weight_stream(list(state), iter(state.items()))
    (method, written), reset = calls
    assert method == "reload_weights" and reset[0] == "reset_prefix_cache"
    assert set(written) == set(state) and torch.equal(written["lm_head.weight"], state["model.embed_tokens.weight"])
    engine.close()


def test_the_shared_memory_cleaner_leaves_reload_folders_alone(tmp_path):
    from srpo_ray.weights.shared_memory import remove_stale_files

    (tmp_path / f"{FOLDER_PREFIX}999999999_x").mkdir()
    (tmp_path / "srpo_weights_999999999_y").write_bytes(b"")
    assert remove_stale_files(str(tmp_path)) == ["srpo_weights_999999999_y"]
    assert (tmp_path / f"{FOLDER_PREFIX}999999999_x").is_dir()


# ----------------------------------------------------------------------------- defect 7

def test_wait_until_stops_at_an_abort_or_the_deadline():
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    polls = iter([False, False, True])
    wait_until(lambda: next(polls), 10.0, lambda: False, "bucket", clock=clock, sleep=sleep)
    with pytest.raises(TransferAborted, match="aborted"):
        wait_until(lambda: False, 10.0, lambda: now[0] > 1.0, "bucket", poll_s=0.5, clock=clock, sleep=sleep)
    with pytest.raises(TransferAborted, match="deadline"):
        wait_until(lambda: False, now[0] + 2, lambda: False, "bucket", poll_s=0.5, clock=clock, sleep=sleep)


class Ref:
    def __init__(self, value=None, error=None, ready=True):
        self.value, self.error, self.ready = value, error, ready


class RefOps:
    """ops over Ref objects; `on_abort` runs when the fleet sets an abort key."""

    def __init__(self):
        self.killed = []

    def get(self, ref, timeout=None):
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref.error:
            raise ref.error
        return ref.value

    def wait(self, refs, num_returns, timeout, fetch_local=True):
        ready = [r for r in refs if r.ready][:max(num_returns, 1)]
        if not ready and timeout:
            time.sleep(min(timeout, 0.01))
        return ready, [r for r in refs if r not in ready]


class Handle:
    def __init__(self, ref):
        self.weights_call = type("M", (), {"remote": staticmethod(lambda *a: ref)})()


class Member:
    def __init__(self, ref):
        self.handle = Handle(ref)


def test_a_dead_nccl_receiver_aborts_the_send_and_the_stuck_ones_are_replaced(monkeypatch):
    from ray.exceptions import RayActorError

    import srpo_ray.weights.broadcast as broadcast

    ops = RefOps()
    send = Ref(ready=False)
    stuck = Ref(ready=False)

    class Store:
        def set(self, key, value):  # rank 0 sees the key, aborts, keeps gathering, fails
            assert key.startswith("abort/")
            send.error, send.ready = TransferAborted("weight bucket 3: aborted (a receiver is gone)"), True
    monkeypatch.setattr(broadcast, "open_store", lambda *a, **k: Store())
    t = NcclTransport(ops)
    members = [Member(Ref(error=RayActorError())), Member(stuck), Member(Ref(value=3))]
    t._group_key = ("learner", tuple(members))  # a formed group: deliver goes straight to the send
    published = PublishedWeights("nccl", [], source="learner", sources=[Handle(send)], publish_id=1,
                                 detail=NcclDetail(("h", 1), 1, MB), timeout_s=30)
    out = t.deliver(published, members, 3)
    assert isinstance(out[0], RayActorError) and out[2] == 3
    assert isinstance(out[1], WeightDeliveryError) and "aborted" in str(out[1])
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

    class Delivery:
        def deliver(self, members, version):
            return next(rounds)
    fleet = fleets.RayRolloutFleet(Pool())
    monkeypatch.setattr(fleet, "_delivery_for", lambda w: Delivery())
    monkeypatch.setattr(fleets.ray, "kill", lambda h, no_restart: killed.append(h))
    asked = []  # load times are asked once, of the members that took the weights
    monkeypatch.setattr(fleet, "_load_seconds", lambda members: asked.append([m.handle for m in members]) or [])
    fleet.push_weights(object(), 7)
    assert killed == ["h0"] and lost == [0]
    assert asked == [["h0"]]  # the one worker the second round's pool still holds


def test_a_push_reports_each_workers_last_load(monkeypatch):
    """A worker that joined between pushes also timed its catch-up load: only the load of
    the push just finished counts; a worker that died has none."""
    from ray.exceptions import RayActorError

    import srpo_ray.runtime.fleets as fleets

    class Handle:
        def __init__(self, answer):
            self.pop_load_seconds = type("Method", (), {"remote": staticmethod(lambda: answer)})()

    monkeypatch.setattr(fleets, "_outcomes", lambda refs: refs)  # the answers stand for their refs
    members = [type("M", (), {"handle": Handle(a)})() for a in ([5.0, 0.8], [0.9], [], RayActorError())]
    assert fleets.RayRolloutFleet._load_seconds(members) == [0.8, 0.9]


# ----------------------------------------------------------------------------- cuda_ipc fleet side

def test_cuda_ipc_fills_every_rank_and_merges_handles_per_chunk():
    log = []

    class Call:
        def __init__(self, who):
            self.who = who

        def remote(self, transport, op, *args):
            log.append((self.who, op, args[:1] if op in ("fill", "chunk") else ()))
            if op == "gpu":
                return Ref(value=f"GPU-{self.who.replace('g', 'r')}")  # g0 on r0's GPU, g2 on none
            if op == "load":  # the host copy, through the object store
                return Ref(value=5)
            if op == "fill":
                return Ref(value={f"GPU-{self.who}": ("args", args[1])})
            if op == "chunk":
                return Ref(value=None) if self.who != "g1" else Ref(error=RuntimeError("gone"))
            return Ref(value=5 if op == "finish" else None)

    def actor(who):
        return type("A", (), {"weights_call": Call(who)})()
    members = [type("M", (), {"handle": actor(g)})() for g in ("g0", "g1", "g2")]
    buckets = plan_stream([TensorSpec(f"w{i}", "bfloat16", (1000,)) for i in range(5)], 3000, "vllm_packed")
    source = actor("r0")
    source.weights_call.remote = lambda transport, op, *a: Ref(value="copy") if op == "catch_up" else \
        Call("r0").remote(transport, op, *a)
    published = PublishedWeights("cuda_ipc", buckets, source=source, sources=[actor("r0"), actor("r1")],
                                 publish_id=2)
    ops = RefOps()
    ops.put = lambda value: Ref(value=value)
    out = CudaIpcTransport(ops).deliver(published, members, 5)
    assert out[0] == 5 and isinstance(out[1], RuntimeError) and out[2] == 5  # g2 loaded the host copy
    assert ("g2", "load", ()) in log and not [e for e in log if e[0] == "g2" and e[1] in ("start", "chunk")]
    fills = [(who, args) for who, op, args in log if op == "fill"]
    assert fills == [(r, (2,)) for _ in buckets for r in ("r0", "r1")]
    chunks = [entry for entry in log if entry[1] == "chunk"]
    assert chunks[0][0] == "g0" and len([c for c in chunks if c[0] == "g1"]) == 1  # g1 dropped after failing
    first = chunks[0][2][0]
    assert set(first["ipc_handles"]) == {"GPU-r0", "GPU-r1"} and first["names"] == [
        s.name for s in distinct_slots(buckets[0])]
    assert [e[1] for e in log][-2:] == ["done", "load"]


def test_closing_a_broadcast_group_hides_only_an_already_closed_group():
    from srpo_ray.weights.broadcast import BroadcastGroup

    group = BroadcastGroup.__new__(BroadcastGroup)

    class Closed:
        def shutdown(self):
            raise RuntimeError("already shut down")
    group._pg = Closed()
    group.close()  # fine

    class Renamed:  # a torch that renamed the method must fail loudly, not leak the group
        pass
    group._pg = Renamed()
    with pytest.raises(AttributeError):
        group.close()
