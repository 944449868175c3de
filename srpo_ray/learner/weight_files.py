"""Rank 0's read of the model files at set-up, bounded in host memory (pure torch,
safetensors and transformers; no Ray).

A safetensors checkpoint is read file by file, in pieces of whole tensors of at most
`piece_bytes` (a larger tensor is a piece of its own), in the dtype `from_pretrained(path,
dtype="auto")` gives them (config.json's, normally the files' own); build_sharded_model
hands each piece to one `set_model_state_dict(..., broadcast_from_rank0=True)` call. So
rank 0 holds one piece besides its shard, not the model (65 GB at 32B bf16), and the
reference model (algo.kl_coef > 0) reads the files again instead of keeping a copy.

Non-persistent buffers (rotary inv_freq) are in no file: rank 0 builds the model with its
parameters on the meta device and its buffers for real, as HF's __init__ computes them.

The values are exactly those of `AutoModelForCausalLM.from_pretrained(path,
dtype="auto").state_dict()` as long as transformers loads the files as they are. Where
this reader cannot tell that (.bin files, keys that HF renames or converts on load,
modules HF keeps in float32, no dtype in config.json, a model key no file holds) rank 0
loads the whole model through from_pretrained instead, as before, and says why in the log.
"""
from __future__ import annotations

import contextlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from srpo_ray.learner.sharded_weights import FullWeights, _tied_embedding_names

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 30  # per set_model_state_dict call: few calls, each a bounded read
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


@dataclass(frozen=True)
class Piece:
    """Tensors of one file read together: (name in the file, name in the model)."""

    file: str
    keys: tuple[tuple[str, str], ...]
    nbytes: int


class LoadedWeights:
    """The whole model through from_pretrained: the fallback, one piece."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        self.state = model.state_dict()
        self.buffers = dict(model.named_buffers())

    def count(self) -> int:
        return 1

    def pieces(self) -> Iterator[dict[str, torch.Tensor]]:
        yield dict(self.state)  # the loader pops from it: keep ours whole for the reference model


class StreamedWeights:
    """The safetensors files read one piece at a time (see the module docstring)."""

    def __init__(self, plan: list[Piece], dtype: torch.dtype, buffers: dict[str, torch.Tensor]):
        self.plan, self.dtype, self.buffers = plan, dtype, buffers

    def count(self) -> int:
        return len(self.plan)

    def pieces(self) -> Iterator[dict[str, torch.Tensor]]:
        from safetensors import safe_open

        opened: tuple[str, object] | None = None
        for piece in self.plan:
            if opened is None or opened[0] != piece.file:
                opened = (piece.file, safe_open(piece.file, framework="pt"))
            yield {name: self._cast(opened[1].get_tensor(key)) for key, name in piece.keys}

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        # what from_pretrained(dtype="auto") does to a floating tensor stored in another dtype
        return tensor.to(self.dtype) if tensor.is_floating_point() and tensor.dtype != self.dtype else tensor


def open_full_weights(model_path: str, piece_bytes: int = PIECE_BYTES) -> FullWeights:
    """Rank 0's weights for build_sharded_model: streamed where possible, else loaded whole."""
    plan = plan_pieces(model_path, piece_bytes)
    if isinstance(plan, str):
        log.info("rank 0 loads the whole model at %s into host memory: %s", model_path, plan)
        return LoadedWeights(model_path)
    return plan


def plan_pieces(model_path: str, piece_bytes: int) -> StreamedWeights | str:
    """The streamed reader of the files at `model_path`, or why they cannot be streamed."""
    from transformers import AutoConfig

    files = safetensors_files(Path(model_path))
    if not files:
        return "no safetensors files (a .bin checkpoint)"
    config = AutoConfig.from_pretrained(model_path)
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        return "config.json names no dtype (transformers would take the first tensor's)"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    skeleton = model_skeleton(config, dtype)
    if getattr(skeleton, "_keep_in_fp32_modules", None) or getattr(skeleton, "_keep_in_fp32_modules_strict", None):
        return f"{type(skeleton).__name__} keeps some modules in float32"
    if _converts_keys(skeleton):
        return f"transformers converts the checkpoint keys of {type(skeleton).__name__} on load"
    names = set(skeleton.state_dict())
    tied = _tied_embedding_names(skeleton)
    alias = tied[1] if tied else None  # re-tied by HF, not read: the embedding's value wins
    prefix = skeleton.base_model_prefix
    plan: list[Piece] = []
    seen: set[str] = set()
    for file in files:
        keys: list[tuple[str, str]] = []
        size = 0
        for key, nbytes in read_header(file):
            name = key if key in names else f"{prefix}.{key}" if f"{prefix}.{key}" in names else None
            if name is None or name in seen:
                return f"{key} in {file} is {'read twice' if name else 'not a name of the model'}"
            seen.add(name)
            if name == alias:
                continue
            if keys and size + nbytes > piece_bytes:
                plan.append(Piece(str(file), tuple(keys), size))
                keys, size = [], 0
            keys.append((key, name))
            size += nbytes
        if keys:
            plan.append(Piece(str(file), tuple(keys), size))
    missing = names - seen - {alias}
    if missing:
        return f"no file holds {sorted(missing)[:3]} (transformers would initialise them)"
    buffers = {n: b for n, b in skeleton.named_buffers() if n not in names}
    return StreamedWeights(plan, dtype, buffers)


def safetensors_files(folder: Path) -> list[Path]:
    """The files from_pretrained reads: those of the index, or the single file."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []


def read_header(file: Path) -> list[tuple[str, int]]:
    """(tensor name, bytes) of a safetensors file, in the order of its data."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(key, end - start) for key, (start, end) in ((k, v["data_offsets"]) for k, v in entries)]


def model_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with its parameters on the meta device and its buffers computed on the
    CPU by its own __init__ (what accelerate's init_empty_weights(include_buffers=False)
    does): its names, ties and buffers without the memory of its weights."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        # made on the CPU but never written (no page touched); one already on meta is kept
        # as it is: a tie (lm_head.weight = embed_tokens.weight) must stay one object
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _converts_keys(model: nn.Module) -> bool:
    """Whether transformers renames or merges this model's checkpoint keys on load
    (MoE experts fused, legacy names): then only from_pretrained knows the values."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # an older transformers: no conversions but prefixes
        return False
    return bool(get_model_conversion_mapping(model, add_legacy=False))
