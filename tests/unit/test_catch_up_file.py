"""A tensor-parallel engine's catch-up through the reload file (#8): the nccl catch-up copy
(object-store buckets gathered from the live model) reaches the engine one bucket at a
time, each written into the file as it arrives and released before the next is fetched;
the free-space check comes before the first fetch; the file is gone after the reload."""
from __future__ import annotations

import weakref
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

from srpo_ray.weights.nccl import NcclTransport
from srpo_ray.weights.object_store import ObjectStoreTransport
from srpo_ray.weights.reload_file import ReloadFolder, ReloadSpaceError
from srpo_ray.weights.source import ModelSource
from srpo_ray.weights.transport import SenderSettings


class Ops:
    """The object store: puts kept; each get hands out fresh arrays (as Ray deserialises
    them) and checks that the ones it handed out before are all released."""

    def __init__(self):
        self.puts, self.gets, self.handed = [], [], []

    def put(self, value):
        self.puts.append([v.copy() for v in value])
        return len(self.puts) - 1

    def get(self, ref):
        alive = [i for i, arrays in self.handed if any(a() is not None for a in arrays)]
        assert not alive, f"bucket {ref} fetched while buckets {alive} are still held"
        value = [v.copy() for v in self.puts[ref]]
        self.gets.append(ref)
        self.handed.append((ref, [weakref.ref(v) for v in value]))
        return value

    def wait(self, refs, num_returns, timeout, fetch_local=True):
        assert len(refs) <= 1, f"{len(refs)} buckets fetched ahead"
        return refs, []

    def current_actor(self):
        return "rank0"

    def node_ip(self):
        return "127.0.0.1"


def _engine(model_dir: str, folder: ReloadFolder, read: list):
    from srpo_ray.generation.engines import VLLMEngine, _checkpoint_tensor_names

    class FakeLLM:  # vLLM's workers reload from the file
        def collective_rpc(self, method, kwargs):
            with safe_open(f"{kwargs['weights_path']}/model.safetensors", framework="pt") as f:
                read.append({k: f.get_tensor(k) for k in f.keys()})

        def reset_prefix_cache(self):
            pass

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.model_path, engine.in_process, engine._llm = model_dir, False, FakeLLM()
    files, tied = _checkpoint_tensor_names(model_dir)
    engine._file_names, engine._expected_names = files, files | ({"lm_head.weight"} if tied else set())
    engine._reload_folder = folder
    return engine


class Receiver:
    worker_index = 0

    def __init__(self, engine):
        self.engine = engine

    def load_stream(self, names, weights, version):
        self.engine.load_weight_stream(names, weights)
        return version


def _catch_up_copy(model_dir: str):
    """What the nccl transport's learner rank 0 hands a late joiner: the model cast to
    bf16 in object-store buckets of 16 KiB (a tied lm_head not sent)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ops = Ops()
    sender = NcclTransport(ops, SenderSettings(ops, bucket_bytes=16 << 10))
    tied = ("model.embed_tokens.weight", "lm_head.weight") if model.config.tie_word_embeddings else None
    published = sender.publish(ModelSource(model, torch.bfloat16, 0, tied, send_tied=False))
    return model, ops, sender.serve_catch_up(published.publish_id)


@pytest.mark.parametrize("tied", [False, True])
def test_a_tp_engine_catches_up_one_bucket_at_a_time(tmp_path, tiny_model_dir, tiny_tied_model_dir, tied):
    model_dir = tiny_tied_model_dir if tied else tiny_model_dir
    model, ops, record = _catch_up_copy(model_dir)
    assert len(record.detail) >= 5
    read: list = []
    engine = _engine(model_dir, ReloadFolder(str(tmp_path)), read)
    assert ObjectStoreTransport(ops).load(record, 7, Receiver(engine)) == 7
    assert ops.gets == list(range(len(record.detail)))  # each bucket once, in order
    (got,) = read
    want = {k: v.bfloat16() for k, v in model.state_dict().items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp_path.iterdir())  # removed once the workers read it


def test_a_reload_file_that_cannot_fit_is_refused_before_a_bucket_is_fetched(tmp_path, monkeypatch,
                                                                            tiny_tied_model_dir):
    import shutil

    _, ops, record = _catch_up_copy(tiny_tied_model_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 10, 0, 64 << 10))
    read: list = []
    engine = _engine(tiny_tied_model_dir, ReloadFolder(str(tmp_path)), read)
    with pytest.raises(ReloadSpaceError, match="--shm-size"):
        ObjectStoreTransport(ops).load(record, 7, Receiver(engine))
    assert ops.gets == [] and read == [] and not list(tmp_path.iterdir())
