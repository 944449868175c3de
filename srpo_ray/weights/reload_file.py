"""The fallback for an engine whose workers live in other processes (tensor parallel >
1) when the weights arrive on the CPU (shared_memory, object_store, gloo broadcast):
one safetensors file that every worker reloads (`reload_weights(weights_path=...)`).
Only used where nothing else reaches the engine: between GPUs the nccl and cuda_ipc
transports hand each worker its data directly.

Written by hand, not with `safetensors.torch.save_file`, which (a) makes a bytes copy of
every tensor first (a second model in host memory) and (b) refuses two names that share
memory (a tied `lm_head.weight` and `model.embed_tokens.weight` from one buffer): here
each tensor's bytes go straight from its (CPU) buffer into the file, and a tied tensor
is simply written under both names. A stream whose layout is known first (the
object-store buckets of a catch-up) is written bucket by bucket as it arrives: the
receiver holds one bucket, not the model, besides the file.

The folder is /dev/shm/srpo_reload_<pid>_<token> (RAM, not disk, when /dev/shm exists): a
prefix of its own, so the shared-memory transport's cleaner (srpo_weights_ files) never
touches it. `ReloadFolder.close()` (and interpreter exit) removes it; folders of dead
processes are removed when the next one is made.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import TYPE_CHECKING, Iterable, Iterator

from srpo_ray.weights.layout import TensorSpec, as_bytes, dtype_name

if TYPE_CHECKING:
    import torch

FOLDER_PREFIX = "srpo_reload_"
DIR_ENV = "SRPO_RELOAD_DIR"  # where the folder goes instead of /dev/shm
FILE_NAME = "model.safetensors"
# safetensors' dtype codes (https://github.com/huggingface/safetensors, format spec)
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class ReloadSpaceError(RuntimeError):
    """The reload file does not fit where it is written (Docker's default /dev/shm is 64 MB)."""


def check_room(folder: str, nbytes: int, replacing: str | None = None) -> None:
    """Raise ReloadSpaceError, before any byte is written, when `nbytes` do not fit in
    `folder` (the file `replacing` is about to be overwritten: its bytes count as free)."""
    free = shutil.disk_usage(folder).free
    if replacing is not None and os.path.exists(replacing):
        free += os.path.getsize(replacing)
    if nbytes > free:
        raise ReloadSpaceError(
            f"the weights of a tensor-parallel engine reload from a {nbytes / 2**30:.2f} GiB file in {folder}, which "
            f"has {free / 2**30:.2f} GiB free. Give it room (Docker: --shm-size=<model size + 10%>; Kubernetes: an "
            f"emptyDir with medium Memory on /dev/shm) or set {DIR_ENV} to a folder with room; or feed the engine "
            "over rollout.weight_transport=nccl (GPU learner), which needs no file")


def write_safetensors(path: str, tensors: Iterable[tuple[str, "torch.Tensor"]]) -> int:
    """Write (name, tensor) pairs as one safetensors file at `path`; bytes written.
    CUDA tensors are copied to the CPU one at a time; tensors sharing memory are fine.
    Refused with ReloadSpaceError before writing when the file would not fit. Holds
    every tensor until the header is written: `write_safetensors_stream` where the
    layout is known before the tensors arrive."""
    items = list(tensors)
    specs = [TensorSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in items]
    return write_safetensors_stream(path, specs, iter(items))


def write_safetensors_stream(path: str, specs: list[TensorSpec], tensors: Iterator[tuple[str, "torch.Tensor"]]) -> int:
    """Write the tensors of `specs` as they arrive from `tensors` (in the specs' order),
    each one dropped once written: a streamed source's buckets can go one by one. The
    header and the free-space check come from the specs, before any tensor."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} has no safetensors code")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    check_room(os.path.dirname(path) or ".", 8 + len(blob) + offset, replacing=path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        expected = iter(specs)
        for name, tensor in tensors:
            spec = next(expected, None)
            if spec is None or (name, dtype_name(tensor.dtype), tuple(tensor.shape)) != (spec.name, spec.dtype,
                                                                                          tuple(spec.shape)):
                raise ValueError(f"reload file: {name} {tuple(tensor.shape)} {dtype_name(tensor.dtype)} arrived "
                                 f"where the layout declared {spec}")
            f.write(memoryview(as_bytes(tensor.detach().cpu()).numpy()))
            del tensor  # its bucket is released before the next one is fetched
        if next(expected, None) is not None:
            raise ValueError(f"reload file: the stream ended before {len(specs)} tensors")
    return 8 + len(blob) + offset


class ReloadFolder:
    """The folder an engine reloads from, made on first use and reused."""

    def __init__(self, directory: str | None = None):
        self.root = directory or os.environ.get(DIR_ENV) or (
            "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.path: str | None = None

    def write(self, tensors: Iterable[tuple[str, "torch.Tensor"]], specs: list[TensorSpec] | None = None) -> str:
        """Write the weights; returns the folder to pass as `weights_path`. With `specs`
        (the stream's layout) each tensor is written as it arrives, else all are taken first."""
        if self.path is None:
            remove_stale_folders(self.root)
            self.path = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}_", dir=self.root)
            atexit.register(self.close)
        file = os.path.join(self.path, FILE_NAME)
        if specs is None:
            write_safetensors(file, tensors)
        else:
            write_safetensors_stream(file, specs, iter(tensors))
        return self.path

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        atexit.unregister(self.close)


def remove_stale_folders(root: str) -> list[str]:
    """Remove srpo_reload_<pid>_* folders whose process is gone."""
    removed = []
    for name in os.listdir(root):
        if not name.startswith(FOLDER_PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            pid = int(name[len(FOLDER_PREFIX):].split("_")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            if os.path.isdir(path):
                with contextlib.suppress(OSError):
                    shutil.rmtree(path)
                    removed.append(name)
        except (ValueError, PermissionError):
            continue
    return removed
