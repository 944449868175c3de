"""Bucket layout of a weight update: planning, packing and unpacking (pure torch, no
Ray, no vLLM).

The learner cuts the full model into buckets of about `rollout.weight_bucket_mb` of
whole tensors, described by `BucketMeta` (names, dtypes, shapes, byte offsets). A tensor
larger than a bucket gets a bucket of its own; tensors that are one and the same (tied
embeddings) are sent once and named twice. A generator rebuilds the named tensors of
each bucket as views (no copy) and feeds them to its engine one bucket after another, so
it never holds more than a bucket or two beyond its own weights.

Two planners share the record:
- `plan_buckets(state, bucket_bytes)`: from tensors in hand, 64-byte aligned, a bucket
  closes before the tensor that would overflow it (the CPU transports).
- `plan_stream(specs, bucket_bytes, rule)`: from `TensorSpec`s (name, dtype, shape) alone,
  before any tensor is gathered, so the learner can stream (gather one parameter, cast
  it, copy it into one of two reused buckets, send) with a known peak. rule="vllm_packed"
  reproduces vLLM's packed NCCL/IPC wire format exactly: tensors back to back without
  padding, and a chunk closes AFTER the tensor that makes it exceed the size
  (vllm/distributed/weight_transfer/packed_tensor.py, `pack_tensors` and
  `packed_nccl_broadcast_consumer` in vLLM 0.33), so vLLM's receiver cuts the byte
  stream where our sender did.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

if TYPE_CHECKING:  # torch is imported where used: a generation worker sets OpenMP's
    import torch  # environment before torch is first imported (srpo_ray/generation/engines.py)

ALIGN_BYTES = 64  # every tensor starts on a 64-byte boundary: any dtype view is aligned
RULES = ("fit", "vllm_packed")


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lies in its bucket: bytes [offset, offset + nbytes)."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BucketMeta:
    """Layout of one bucket: `nbytes` bytes when packed flat. Two slots may share an
    offset (tied tensors, sent once)."""

    slots: tuple[TensorSlot, ...]
    nbytes: int


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the wire will carry it, known before it exists: its name, dtype (the
    engine's, after the cast) and full shape. `alias_of`: the name of an earlier spec
    holding the very same data (a tied embedding): sent once, named twice."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def dtype_size(dtype: str) -> int:
    import torch

    return getattr(torch, dtype).itemsize


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(n: int, align: int = ALIGN_BYTES) -> int:
    return (n + align - 1) // align * align


def _identity(t: "torch.Tensor") -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def specs_of(state: Mapping[str, "torch.Tensor"]) -> list[TensorSpec]:
    """The specs of tensors in hand; a tensor that is the very same data as an earlier
    one (tied weights) becomes an alias of it."""
    specs, first_name = [], {}
    for name, tensor in state.items():
        key = _identity(tensor)
        alias = first_name.get(key)
        specs.append(TensorSpec(name, dtype_name(tensor.dtype), tuple(tensor.shape), alias))
        first_name.setdefault(key, name)
    return specs


def plan_buckets(state: Mapping[str, "torch.Tensor"], bucket_bytes: int) -> list[BucketMeta]:
    """Group the tensors of `state` (in its order) into buckets of at most
    `bucket_bytes` each (a larger tensor gets a bucket of its own). A tensor that is
    the very same data as an earlier one (tied weights) is not sent again: its name is
    added to the earlier one's bucket, pointing at the same bytes."""
    return plan_stream(specs_of(state), bucket_bytes, rule="fit")


def plan_stream(specs: Iterable[TensorSpec], bucket_bytes: int, rule: str = "fit") -> list[BucketMeta]:
    """Buckets for `specs` in order, planned before any tensor exists.

    rule "fit": 64-byte aligned offsets; a bucket closes before a tensor that would
    overflow `bucket_bytes` (a larger tensor travels alone). rule "vllm_packed":
    vLLM's packed wire format (no padding; a chunk closes after the tensor that makes
    it exceed `bucket_bytes`). Aliases join their original's bucket at its offset."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size {bucket_bytes} bytes: must be >= 1 (rollout.weight_bucket_mb > 0)")
    if rule not in RULES:
        raise ValueError(f"bucket rule {rule!r}: must be one of {RULES}")
    align = ALIGN_BYTES if rule == "fit" else 1
    buckets: list[list[TensorSlot]] = []
    sizes: list[int] = []
    closed = True
    placed: dict[str, tuple[int, TensorSlot]] = {}
    for spec in specs:
        if spec.alias_of is not None:
            if spec.alias_of not in placed:
                raise ValueError(f"{spec.name} aliases {spec.alias_of}, which comes later or not at all")
            index, first = placed[spec.alias_of]
            buckets[index].append(TensorSlot(spec.name, first.dtype, first.shape, first.offset, first.nbytes))
            continue
        nbytes = spec.nbytes
        if rule == "fit":
            closed = not buckets or (sizes[-1] > 0 and _aligned(sizes[-1]) + nbytes > bucket_bytes)
        if closed:
            buckets.append([])
            sizes.append(0)
        offset = _aligned(sizes[-1], align)
        slot = TensorSlot(spec.name, spec.dtype, tuple(spec.shape), offset, nbytes)
        buckets[-1].append(slot)
        placed[spec.name] = (len(buckets) - 1, slot)
        sizes[-1] = offset + nbytes
        if rule == "vllm_packed":
            closed = sizes[-1] > bucket_bytes
    return [BucketMeta(tuple(slots), size) for slots, size in zip(buckets, sizes)]


def streaming_peak_bytes(buckets: list[BucketMeta], buffers: int = 2) -> int:
    """Extra memory a streaming sender holds for `buckets`: `buffers` reused buffers of
    the largest bucket (one being sent while the next fills), never the model."""
    return buffers * max((b.nbytes for b in buckets), default=0)


def distinct_slots(meta: BucketMeta) -> list[TensorSlot]:
    """The slots that own their bytes (a tied tensor's second name owns none)."""
    seen: set[int] = set()
    out = []
    for slot in meta.slots:
        if slot.offset not in seen:
            seen.add(slot.offset)
            out.append(slot)
    return out


def as_bytes(tensor: "torch.Tensor") -> "torch.Tensor":
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_bucket(state: Mapping[str, "torch.Tensor"], meta: BucketMeta, device: Any = "cpu",
                out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The bucket's bytes as one flat uint8 tensor [meta.nbytes] on `device` (written
    into `out` when it fits: reusing a buffer skips the page faults of a fresh one)."""
    import torch

    flat = out if out is not None and out.numel() == meta.nbytes else \
        torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
    for slot in distinct_slots(meta):
        flat[slot.offset:slot.offset + slot.nbytes].copy_(as_bytes(state[slot.name]))
    return flat


def bucket_parts(state: Mapping[str, "torch.Tensor"], meta: BucketMeta) -> list["torch.Tensor"]:
    """The bucket as one flat uint8 view per distinct tensor, without a copy: the
    object store writes each part straight into shared memory (one copy in all)."""
    return [as_bytes(state[slot.name]) for slot in distinct_slots(meta)]


def packed_parts(flat: "torch.Tensor", meta: BucketMeta) -> list["torch.Tensor"]:
    """The parts of a packed bucket (views into `flat`)."""
    return [flat[slot.offset:slot.offset + slot.nbytes] for slot in distinct_slots(meta)]


def unpack_bucket(flat: "torch.Tensor", meta: BucketMeta) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor) for each slot of a received flat bucket, as views into `flat`
    (uint8 [meta.nbytes]): no copy. The caller must not reuse `flat` while a view is
    alive (vLLM buffers a layer's weights until the whole layer has arrived)."""
    if flat.numel() != meta.nbytes:
        raise ValueError(f"bucket of {flat.numel()} bytes, its layout says {meta.nbytes}")
    return unpack_parts(packed_parts(flat, meta), meta)


def unpack_parts(parts: list["torch.Tensor"], meta: BucketMeta) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor) for each slot from the bucket's parts (flat uint8 tensors, one per
    distinct tensor, as `bucket_parts` made them), as views: no copy."""
    import torch

    owners = distinct_slots(meta)
    if len(parts) != len(owners) or any(p.numel() != s.nbytes for p, s in zip(parts, owners)):
        raise ValueError(f"bucket parts of {[p.numel() for p in parts]} bytes, its layout says "
                         f"{[s.nbytes for s in owners]}")
    by_offset = {slot.offset: part for slot, part in zip(owners, parts)}
    for slot in meta.slots:
        yield slot.name, by_offset[slot.offset].view(getattr(torch, slot.dtype)).reshape(slot.shape)


def bucket_tensor_names(buckets: Iterable[BucketMeta]) -> list[str]:
    return [slot.name for b in buckets for slot in b.slots]


class LaidOutNames(list):
    """The names of a stream, in its order (a list of str, as every receiver takes
    them), that also carries each tensor's spec: what a receiver writing a file needs
    before the first tensor arrives (the reload file's header and free-space check)."""

    def __init__(self, specs: Iterable[TensorSpec]):
        self.specs = list(specs)
        super().__init__(spec.name for spec in self.specs)


def laid_out_names(buckets: Iterable[BucketMeta]) -> LaidOutNames:
    """The names of the buckets' stream with their dtypes and shapes (unpack order)."""
    return LaidOutNames(TensorSpec(slot.name, slot.dtype, slot.shape) for b in buckets for slot in b.slots)


def tensor_from_buffer(buffer: Any) -> "torch.Tensor":
    """A uint8 tensor over a read-only array from the object store, without a copy.
    Nothing writes to it: the engine copies the values into its own
    parameters, so the read-only warning does not apply."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(buffer)
