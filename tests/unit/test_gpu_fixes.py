"""GPU-path fixes a CPU can check: the weight stream gathers engine-dtype shards (#6),
cuda_ipc only where learner and generator share one GPU (#9), the colocated learner
empties PyTorch's GPU cache after a step (#3), rank 0 never holds the model in float32 on
its host (#7: loading, checkpoints)."""
from __future__ import annotations

import pytest
import torch
from learner_cases import free_port

from srpo_ray.config.load import load_config
from srpo_ray.weights.transport import resolve_for, resolve_transport

# ----------------------------------------------------------------------------- 6


def test_the_stream_casts_each_shard_before_gathering_it(monkeypatch):
    """FSDP2 (one gloo rank here): every full_tensor() all-gather moves bf16, never the
    fp32 master shard (half the bytes on the wire and in the gathered buffer)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from srpo_ray.weights.source import ModelSource

    gathered = []
    real = DTensor.full_tensor
    monkeypatch.setattr(DTensor, "full_tensor", lambda self, **kw: gathered.append(self.dtype) or real(self, **kw))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        want = {n: p.full_tensor().to(torch.bfloat16) for n, p in model.state_dict().items()}
        gathered.clear()
        got = dict(ModelSource(model, torch.bfloat16, 0).tensors())
    finally:
        dist.destroy_process_group()
    assert gathered and set(gathered) == {torch.bfloat16}, gathered
    assert all(torch.equal(got[n], want[n]) for n in want)


# ----------------------------------------------------------------------------- 9


def test_cuda_ipc_only_when_learner_and_generators_share_one_gpu():
    assert resolve_transport("auto", 0.5, 0.5, True, 1, generators_per_rank=1) == "cuda_ipc"
    assert resolve_transport("auto", 0.5, 0.25, True, 1, generators_per_rank=2) == "cuda_ipc"
    # 0.5 + 3 x 0.5 = a two-GPU bundle: some generators sit on the other GPU
    assert resolve_transport("auto", 0.5, 0.5, True, 1, generators_per_rank=3) == "object_store"
    with pytest.raises(ValueError, match="sharing ONE GPU"):
        resolve_transport("cuda_ipc", 0.5, 0.5, True, 1, generators_per_rank=3)
    with pytest.raises(ValueError, match="sharing ONE GPU"):
        resolve_transport("cuda_ipc", 1, 1, True)  # a {GPU: 2} bundle: two GPUs
    one_rank = ["learner.num_ranks=1", "learner.gpus_per_rank=0.5", "rollout.gpus_per_worker=0.5",
                "cluster.colocate=true"]
    assert resolve_for(load_config(None, one_rank + ["rollout.num_workers=1"])) == "cuda_ipc"
    assert resolve_for(load_config(None, one_rank + ["rollout.num_workers=3"])) == "object_store"


# ----------------------------------------------------------------------------- 3


def test_a_colocated_gpu_learner_empties_the_cache_after_its_step(monkeypatch):
    from srpo_ray.learner import core

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert core.release_gpu_cache(torch.device("cuda", 0), colocated=True) and emptied == [1]
    assert not core.release_gpu_cache(torch.device("cuda", 0), colocated=False)
    assert not core.release_gpu_cache(torch.device("cpu"), colocated=True) and emptied == [1]


def test_send_and_ipc_buffers_do_not_outlive_an_update(monkeypatch):
    """nccl: rank 0's two buckets (2.9 GiB at 32B) go back after every send, failed or not;
    cuda_ipc: the exported buffer goes back to the driver once the generators finished."""
    from srpo_ray.weights.cuda_ipc import CudaIpcTransport
    from srpo_ray.weights.nccl import NcclTransport, TransferAborted
    from srpo_ray.weights.source import StateDictSource
    from srpo_ray.weights.transport import SenderSettings

    ops = type("Ops", (), {"node_ip": lambda self: "127.0.0.1", "current_actor": lambda self: "rank0"})()
    nccl = NcclTransport(ops, SenderSettings(ops, bucket_bytes=1 << 10))
    nccl._control.serve = lambda: ("127.0.0.1", 1)  # no TCPStore needed here
    published = nccl.publish(StateDictSource({"w": torch.ones(8)}))
    nccl._comm, nccl._buffers = object(), [torch.empty(1 << 10, dtype=torch.uint8)] * 2

    def aborted(publish_id, key):
        raise TransferAborted("a receiver is gone")
    monkeypatch.setattr(nccl, "_stream", aborted)
    with pytest.raises(TransferAborted):
        nccl.serve_send(published.publish_id, "abort/x")
    assert nccl._buffers == []

    calls = []
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: calls.append("ipc_collect"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    ipc = CudaIpcTransport(ops)
    ipc._buffer, ipc._handle = torch.empty(16, dtype=torch.uint8), {"GPU-0": ()}
    ipc.serve_done()
    assert ipc._buffer is None and ipc._handle is None and calls == ["ipc_collect", "empty_cache"]


# ----------------------------------------------------------------------------- 7 (learner host memory)


def test_rank_0_loads_the_files_in_their_own_dtype(tmp_path, tiny_tied_model_dir):
    """A bf16 checkpoint is read as bf16: half a float32 copy on rank 0's host (the float32
    shards then take each tensor, an exact widening)."""
    from transformers import AutoModelForCausalLM

    from srpo_ray.learner.weight_files import open_full_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    pieces = list(open_full_weights(str(tmp_path / "bf16")).pieces())
    assert {t.dtype for p in pieces for t in p.values() if t.is_floating_point()} == {torch.bfloat16}


def test_a_checkpoints_weights_are_gathered_per_tensor_in_the_compute_dtype(monkeypatch, tiny_tied_model_dir):
    import torch.distributed as dist
    from learner_cases import learner_cfg
    from torch.distributed.tensor import DTensor

    from srpo_ray.learner.core import FSDPLearner

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = learner_cfg()
    cfg.model.dtype = "bfloat16"  # CPU compute in bf16: FSDP2 shards and casts, masters stay fp32
    learner = FSDPLearner(tiny_tied_model_dir, cfg, rank=0, world_size=1)
    gathered = []
    real = DTensor.full_tensor
    try:
        learner.setup()
        assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
        monkeypatch.setattr(DTensor, "full_tensor", lambda self, **kw: gathered.append(self.dtype) or real(self, **kw))
        state = learner.full_state_dict()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert gathered and set(gathered) == {torch.bfloat16}, set(gathered)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


# ----------------------------------------------------------------------------- 8


def test_a_reload_file_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from srpo_ray.weights.reload_file import ReloadFolder, ReloadSpaceError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))  # Docker's /dev/shm
    folder = ReloadFolder(str(tmp_path))
    big = torch.empty(17 << 20, dtype=torch.float32)  # 68 MiB
    with pytest.raises(ReloadSpaceError, match="--shm-size"):
        folder.write(iter([("w", big)]))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    folder.write(iter([("w", torch.ones(4))]))  # a small one fits
    folder.close()


def test_a_tp_engine_removes_its_reload_file_once_read(tmp_path, tiny_tied_model_dir):
    """The file lives only while vLLM's workers read it (a killed actor runs no close())."""
    from transformers import AutoModelForCausalLM

    from srpo_ray.generation.engines import VLLMEngine, _checkpoint_tensor_names
    from srpo_ray.weights.reload_file import ReloadFolder

    seen = []

    class FakeLLM:
        def collective_rpc(self, method, kwargs):
            seen.append(sorted(p.name for p in tmp_path.rglob("*.safetensors")))

        def reset_prefix_cache(self):
            pass

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.model_path, engine.in_process, engine._llm = tiny_tied_model_dir, False, FakeLLM()
    files, _ = _checkpoint_tensor_names(tiny_tied_model_dir)
    engine._file_names, engine._expected_names = files, files | {"lm_head.weight"}
    engine._reload_folder = ReloadFolder(str(tmp_path))
    state = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir).state_dict()
    for _ in range(2):
        engine.load_weight_stream(list(state), iter(state.items()))
        assert not list(tmp_path.iterdir())
    assert seen == [["model.safetensors"]] * 2
