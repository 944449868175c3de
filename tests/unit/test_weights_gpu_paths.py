"""What the GPU weight paths do that a CPU can check (issue #10, defects 2, 3, 4, 7):

- streaming planner: peak = two buckets, not the model;
- the file fallback writes tied embeddings (safetensors.save_file refuses them);
- cuda_ipc's fleet side merges every rank's handle per chunk, in order.

(Against the installed vLLM's packer and dataclasses, and with Ray's errors and fleets:
tests/ray/test_weights_gpu_paths_ray.py.)
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from weight_fakes import MB, Ref, RefOps, qwen32b_specs

from srpo_ray.weights.cuda_ipc import CudaIpcTransport
from srpo_ray.weights.layout import TensorSpec, distinct_slots, plan_stream, streaming_peak_bytes
from srpo_ray.weights.nccl import TransferAborted, wait_until
from srpo_ray.weights.object_store import ObjectStoreTransport
from srpo_ray.weights.reload_file import FOLDER_PREFIX, ReloadFolder
from srpo_ray.weights.source import ModelSource
from srpo_ray.weights.transport import PublishedWeights, SenderSettings

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
    import tempfile

    from transformers import AutoModelForCausalLM

    from srpo_ray.models import build_tiny_model
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
    assert out[0] == 5 and isinstance(out[1], RuntimeError) and out[2] == 5  # g2 loaded the on-demand copy
    assert ("g2", "load", ()) in log and not [e for e in log if e[0] == "g2" and e[1] in ("start", "chunk")]
    fills = [(who, args) for who, op, args in log if op == "fill"]
    assert fills == [(r, (2,)) for _ in buckets for r in ("r0", "r1")]
    chunks = [entry for entry in log if entry[1] == "chunk"]
    assert chunks[0][0] == "g0" and len([c for c in chunks if c[0] == "g1"]) == 1  # g1 dropped after failing
    first = chunks[0][2][0]
    assert set(first["ipc_handles"]) == {"GPU-r0", "GPU-r1"} and first["names"] == [
        s.name for s in distinct_slots(buckets[0])]
    # g2's copy is gathered on demand by every rank (a collective), after the update is done
    assert [e[1] for e in log][-5:] == ["done", "done", "catch_up", "catch_up", "load"]


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
