"""Weights in and out of the sharded learner (pure torch + torch.distributed, no Ray):
building a model already sharded, full state dicts, checkpoints, returning freed heap.

Loading. Only rank 0 reads the model files, a piece at a time (srpo_ray/learner/
weight_files.py: a file, or a gigabyte of it, never the whole model); every rank builds
the model on the meta device (no memory), shards it with FSDP2, allocates just its own
shard and receives the weights from rank 0 one tensor at a time
(torch.distributed.checkpoint's broadcast_from_rank0, one call per piece). Host memory per
rank other than 0: its shard plus the largest single tensor, instead of a whole model.
Buffers that are not in the state dict (rotary inv_freq) are broadcast from rank 0's.

Host memory of a step: srpo_ray/host_heap.py (learner.host_heap).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from srpo_ray.fileio import fsync_tree
from srpo_ray.host_heap import release_free_memory

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

# Files of the source model folder that are not weights: copied next to saved weights so
# the checkpoint's hf/ folder is a complete model (config, generation config, tokenizer).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


# ----------------------------------------------------------------------------- loading

class FullWeights(Protocol):
    """Rank 0's weights at set-up (srpo_ray/learner/weight_files.py): the state dict in
    pieces, HF model names, in the files' dtype (each tensor is copied into the float32
    shards: an exact widening); pieces() may be called again (the reference model)."""

    buffers: dict[str, torch.Tensor]  # at least those not in the state dict (rotary inv_freq)

    def count(self) -> int: ...

    def pieces(self) -> Iterator[dict[str, torch.Tensor]]: ...


def build_sharded_model(model_path: str, mesh, device: torch.device, dtype: torch.dtype,
                        full: FullWeights | None, mp_policy: "MixedPrecisionPolicy | None" = None,
                        gradient_checkpointing: bool = False,
                        trainable: bool = True) -> tuple[nn.Module, tuple[str, str] | None]:
    """The HF model at `model_path`, parameters in `dtype`, sharded with FSDP2 (each
    decoder layer, then the root) over `mesh`, weights from rank 0. Collective.

    full: weight_files.open_full_weights(model_path) on rank 0, None on the other ranks.
    trainable=False: parameters without gradients (set before sharding: FSDP2 keeps it).
    Returns (model, tied embedding names or None)."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dist.get_rank() == 0) != (full is not None):
        raise ValueError("build_sharded_model: rank 0 (and only rank 0) passes the full weights")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    model.config.use_cache = False
    model.requires_grad_(trainable)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tied = _tied_embedding_names(model)
    sharded = mesh.size() > 1 or (mp_policy is not None and mp_policy.param_dtype not in (None, dtype))
    if sharded:  # one rank with nothing to cast stays a plain module: no FSDP2 copies per layer
        kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    model.to_empty(device=device)  # allocates this rank's shards only (uninitialised)
    if not sharded and tied:
        model.tie_weights()  # to_empty gave the shared tensor two storages
    _load_pieces(model, full)
    if tied and _tied_embedding_names(model) != tied:
        raise RuntimeError(f"{type(model).__name__}: sharding untied the embeddings {tied}")
    return model, tied


def _load_pieces(model: nn.Module, full: FullWeights | None) -> None:
    """Rank 0's pieces into every rank's shards. Each set_model_state_dict call broadcasts
    the keys of rank 0's piece first (the other ranks pass nothing and learn them), so
    the ranks only need to agree on the number of calls; strict=False since each call
    holds part of the keys (the others are copied onto themselves). The plan covered
    every key before the first call (weight_files.plan_pieces)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    count = [full.count() if full is not None else 0]
    dist.broadcast_object_list(count, src=0)
    pieces = full.pieces() if full is not None else None
    for _ in range(count[0]):  # the piece is only referenced by the call: freed when it returns
        set_model_state_dict(model, next(pieces) if pieces is not None else {}, options=options)
    if pieces is not None:
        pieces.close()
    in_state = set(model.state_dict())
    for name, buf in model.named_buffers():  # non-persistent ones (rotary) are not in the state dict
        if name in in_state:
            continue
        if full is not None:
            buf.copy_(full.buffers[name])
        dist.broadcast(buf, src=0)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (FSDP2 shards each one as a unit), found by the class
    names HF lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                         f"(_no_split_modules={sorted(names)}); this architecture is not supported")
    return layers


def _tied_embedding_names(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding weight name, output embedding weight name) if they are one tensor."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"


# ----------------------------------------------------------------------------- weights out

class ShardedWeightsIO:
    """full_state_dict and checkpoints for FSDPLearner (mixed in), which provides:
    model (FSDP2-sharded), optimizer, optimizer_steps, rank, compute_dtype,
    model_path (the source folder) and _tied_names."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) model state on CPU with HF names, on rank 0; None on the
        others. Collective. Floating tensors are in model.dtype (the float32 master
        weights cast, as generators run them). Includes the tied output embedding
        (lm_head.weight) when the model ties it: generators that reload weights need
        every name."""
        from srpo_ray.weights.source import ModelSource

        # one parameter at a time: cast this rank's shard, gather it, keep it on rank 0's
        # host; never the float32 model in host memory (130 GB at 32B)
        state = ModelSource(self._require_setup(), self.compute_dtype, self.rank, self._tied_names).state_dict()
        if self.rank != 0:
            release_free_memory()  # the gathered tensors this rank dropped
        return state

    def weight_source(self, dtype: torch.dtype, send_tied: bool = True):
        """The weights streamed one parameter at a time, cast to `dtype` on this rank's
        device (srpo_ray/weights/source.py): every rank iterates it together."""
        from srpo_ray.weights.source import ModelSource

        return ModelSource(self._require_setup(), dtype, self.rank, self._tied_names, send_tied)

    def save_checkpoint(self, directory: str) -> None:
        """Write `directory`/hf/ (rank 0: safetensors weights + config + tokenizer, loadable
        by transformers and vLLM) and `directory`/learner/ (every rank: its model and
        optimizer shards, torch.distributed.checkpoint format). Collective. `directory`
        must be on a filesystem every rank sees; making it atomic (temp dir + rename) is
        the caller's job, but every file is fsynced before this returns."""
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        state = self.full_state_dict()
        if self.rank == 0:
            _write_hf_model(state, directory / "hf", self.model_path, self._tied_names)
        del state
        dcp.save(self._sharded_state(), storage_writer=dcp.FileSystemWriter(str(directory / "learner"),
                                                                            sync_files=True))
        if self.rank == 0:
            fsync_tree(directory / "learner")
        dist.barrier()
        release_free_memory()

    def load_checkpoint(self, directory: str) -> None:
        """Restore model and optimizer from `directory`/learner/ (written by
        save_checkpoint, possibly with a different number of ranks: DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = Path(directory) / "learner"
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} holds no learner checkpoint (no .metadata); pass a "
                                    f"directory written by save_checkpoint")
        state = self._sharded_state()
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.optimizer_steps = int(state["optimizer_steps"])
        del state
        release_free_memory()

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model = self._require_setup()
        if not self.optimizer.state:
            # get_state_dict creates AdamW's state with a zero-gradient, lr=0 step, which
            # also counts as step 1 in Adam's bias correction; reset the counter so the
            # first real update stays a true first step (here and after a resume).
            get_state_dict(model, self.optimizer)
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"].zero_()
        model_state, optim_state = get_state_dict(model, self.optimizer)
        return {"model": model_state, "optim": optim_state, "optimizer_steps": self.optimizer_steps}


def _write_hf_model(state: dict[str, torch.Tensor], out_dir: Path, source_dir: str,
                    tied_names: tuple[str, str] | None) -> None:
    """HF layout: safetensors shards (+ index when sharded) and every non-weight file of
    the source model folder (config.json, generation_config.json, tokenizer files)."""
    from huggingface_hub import save_torch_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(state)
    if tied_names:  # HF convention: the tied copy is not stored; loaders re-tie it
        weights.pop(tied_names[1], None)
    save_torch_state_dict(weights, out_dir, max_shard_size="5GB", metadata={"format": "pt"})
    for item in Path(source_dir).iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, out_dir / item.name)
    fsync_tree(out_dir)
