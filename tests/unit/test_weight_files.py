"""Rank 0 reads the model files piece by piece at set-up (srpo_ray/learner/weight_files.py):
the values every rank ends with are from_pretrained's, bit for bit, and rank 0 never holds
more than one file's tensors."""
from __future__ import annotations

import json
import logging
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from learner_cases import free_port, learner_cfg

from srpo_ray.learner.weight_files import (
    LoadedWeights,
    StreamedWeights,
    open_full_weights,
    read_header,
    safetensors_files,
)

SHARD = "100KB"  # a tiny model (460-600 KB) in 5 files or more


def _copy_configs(src: str, out: Path) -> None:
    """The tokenizer files (save_pretrained wrote the configs and weights)."""
    for item in Path(src).iterdir():
        if item.is_file() and not (out / item.name).exists() and not item.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(item, out / item.name)


def _variant(src: str, out: Path, kind: str) -> str:
    """`src` saved again: in several files ("sharded"), in bf16 ("bf16"), float32 files
    under a bfloat16 config ("cast"), the base model without its `model.` prefix ("base")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    (model.model if kind == "base" else model).save_pretrained(out, max_shard_size=SHARD)
    if kind == "cast":
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (out / "config.json").write_text(json.dumps(config))
    _copy_configs(src, out)
    return str(out)


def _expected(model_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return model.state_dict(), dict(model.named_buffers())


def _assert_streams_as_from_pretrained(model_dir: str, piece_bytes: int) -> StreamedWeights:
    weights = open_full_weights(model_dir, piece_bytes=piece_bytes)
    assert isinstance(weights, StreamedWeights)
    state, buffers = _expected(model_dir)
    got: dict[str, torch.Tensor] = {}
    for piece in weights.pieces():
        assert not got.keys() & piece.keys()
        got.update(piece)
    shared = state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    tied = {"lm_head.weight"} if shared else set()
    assert got.keys() == state.keys() - tied
    for name, value in got.items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    assert weights.buffers.keys() and weights.buffers.keys() <= buffers.keys()  # the rotary inv_freq
    for name, value in weights.buffers.items():
        assert value.dtype == buffers[name].dtype and torch.equal(value, buffers[name]), name
    return weights


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["sharded", "bf16", "cast"])
def test_the_pieces_are_what_from_pretrained_loads(tmp_path, tiny_model_dir, tiny_tied_model_dir, tied, kind):
    model_dir = _variant(tiny_tied_model_dir if tied else tiny_model_dir, tmp_path, kind)
    files = safetensors_files(Path(model_dir))
    assert len(files) >= 3
    weights = _assert_streams_as_from_pretrained(model_dir, piece_bytes=64 << 10)
    assert weights.count() > len(files)  # a file is cut into pieces of at most piece_bytes (or one tensor)
    largest = max(n for f in files for _, n in read_header(f))
    assert all(p.nbytes <= max(64 << 10, largest) for p in weights.plan)


def test_a_base_models_checkpoint_is_streamed_under_the_causal_lms_names(tmp_path, tiny_tied_model_dir):
    _assert_streams_as_from_pretrained(_variant(tiny_tied_model_dir, tmp_path, "base"), piece_bytes=1 << 30)


@pytest.mark.slow
def test_smollm2_streams_as_from_pretrained_loads_it(smollm2_dir):
    _assert_streams_as_from_pretrained(smollm2_dir, piece_bytes=1 << 30)


def test_a_bin_checkpoint_is_loaded_whole_with_a_log_line(tmp_path, tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="srpo_ray.learner.weight_files"):
        weights = open_full_weights(str(tmp_path))
    assert isinstance(weights, LoadedWeights) and "a .bin checkpoint" in caplog.text
    (piece,) = list(weights.pieces())
    assert all(torch.equal(piece[k], v) for k, v in model.state_dict().items())


def test_rank_0_holds_one_files_tensors_at_a_time(tmp_path, monkeypatch, tiny_tied_model_dir):
    """Set-up of a learner with a reference model from a checkpoint in several files: every
    set_model_state_dict call gets tensors of one file only, and the tensors of the calls
    before are gone by then (the whole model went in one call before)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict as dsd

    from srpo_ray.learner.core import FSDPLearner

    model_dir = _variant(tiny_tied_model_dir, tmp_path, "sharded")
    file_of = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    file_bytes = {f.name: sum(n for _, n in read_header(f)) for f in safetensors_files(tmp_path)}
    calls: list[tuple[set[str], int]] = []
    earlier: list[weakref.ref] = []
    real = dsd.set_model_state_dict

    def recording(model, state, *, options=None):
        assert all(ref() is None for ref in earlier), "a previous piece is still held"
        calls.append(({file_of[k] for k in state}, sum(t.numel() * t.element_size() for t in state.values())))
        earlier.extend(weakref.ref(t) for t in state.values())
        return real(model, state, options=options)

    monkeypatch.setattr(dsd, "set_model_state_dict", recording)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = learner_cfg()
    cfg.algo.kl_coef = 0.1  # the reference model reads the files again
    learner = FSDPLearner(model_dir, cfg, rank=0, world_size=1)
    try:
        learner.setup()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(calls) == 2 * len(file_bytes)  # one call per file (each under a gigabyte), twice
    for files, nbytes in calls:
        assert len(files) == 1 and nbytes <= file_bytes[next(iter(files))]
    assert sum(n for _, n in calls) == 2 * sum(file_bytes.values())


def test_one_and_two_ranks_end_with_from_pretrained_values(tmp_path, tiny_model_dir, tiny_tied_model_dir):
    """The policy's float32 masters, the reference model and every rank's buffers, after
    set-up from checkpoints in several files (tied, untied, bf16): from_pretrained's
    values exactly (widened where the learner holds float32)."""
    import torch.multiprocessing as mp
    from weight_files_ranks import run_rank

    dirs = [_variant(src, tmp_path / f"{kind}{i}", kind)
            for i, (src, kind) in enumerate([(tiny_model_dir, "sharded"), (tiny_tied_model_dir, "sharded"),
                                             (tiny_tied_model_dir, "bf16")])]
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        runs = [(d, free_port()) for d in dirs]
        mp.start_processes(run_rank, args=(world, runs, str(out)), nprocs=world, join=True, start_method="spawn")
        for i, model_dir in enumerate(dirs):
            state, buffers = _expected(model_dir)
            saved = torch.load(out / f"run{i}.pt")
            for which in ("policy", "ref"):  # the reference's dict may name a tied tensor once
                assert saved[which].keys() >= state.keys() - {"lm_head.weight"}, which
                for name, got in saved[which].items():
                    assert torch.equal(got, state[name].to(got.dtype)), (world, model_dir, which, name)
            for rank in range(world):
                got = torch.load(out / f"run{i}_buffers{rank}.pt")
                assert got.keys() == buffers.keys()
                assert all(torch.equal(got[n], b.to(got[n].dtype)) for n, b in buffers.items())
