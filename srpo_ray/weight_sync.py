"""Bucketed, versioned weight transfer from the learner to the generators: the parts
that need neither Ray nor vLLM.

The learner's rank 0 cuts its full state dict into buckets of about
`rollout.weight_bucket_mb` of whole tensors, described by `BucketMeta` (names, dtypes,
shapes, byte offsets). A tensor larger than a bucket gets a bucket of its own; tensors
that are one and the same (tied embeddings) are sent once and named twice. A generator
rebuilds the named tensors of each bucket as views (no copy) and feeds them to its
engine one bucket after another, so it never holds more than a bucket or two beyond
its own weights.

Three transports move the buckets (`rollout.weight_transport`):
- shared_memory (srpo_ray/weight_shm.py): rank 0 keeps one /dev/shm file, reused for
  every version, and copies the buckets into it in a background thread; generators on
  its node keep the file mapped and hand views of it to their engine as each tensor's
  bytes land (pipelined). A generator on another node gets an object-store copy.
- object_store: rank 0 puts each bucket into Ray's object store as a list of flat byte
  views, one per tensor (`bucket_parts`: Ray copies them straight into shared memory);
  every generator fetches them (zero-copy on the same node, one pull per node otherwise).
- broadcast: each bucket is packed into one flat byte tensor at aligned offsets
  (`pack_bucket`). Rank 0 and the generators form a torch.distributed group of their
  own (`BroadcastGroup`: gloo on CPU, NCCL on GPU), built from a TCPStore without
  init_process_group so it touches neither the learner's FSDP group nor vLLM's; the
  layout travels through Ray first, then each bucket is one broadcast.

Measured (bench/bench_weight_sync.py, 338 MB float32 model, 64 MiB buckets, 2 shared
cores; a plain memory copy of the bytes 0.020-0.023 s), publish + deliver end to end to
one copy-into-place receiver: shared_memory 0.05 s (2.2-2.4x the copy), object_store
0.09-0.28 s (4-12x: every publish faults in fresh shared memory), broadcast (gloo)
0.3 s (14x). Here one memcpy thread already saturates memory bandwidth, so the two
copies (into the file, out into the engine) cannot overlap below 2x; gathering the
learner's state straight into the file would remove the first. Real vLLM engines:
about 0.35 s whatever the transport (vLLM's reload and CPU repacking dominate).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

if TYPE_CHECKING:  # torch is imported where used: a generation worker sets OpenMP's
    import torch   # environment before torch is first imported (actors/engines.py)

TRANSPORTS = ("auto", "shared_memory", "object_store", "broadcast")
ALIGN_BYTES = 64  # every tensor starts on a 64-byte boundary: any dtype view is aligned


class StalePolicyError(RuntimeError):
    """A generation worker was asked for rollouts of a policy version it does not hold."""

    def __init__(self, worker_index: int, held: int, expected: int):
        self.worker_index, self.held, self.expected = worker_index, held, expected
        super().__init__(f"generation worker {worker_index} holds policy version {held}, caller "
                         f"expected {expected}: a weight update was missed")

    def __reduce__(self):  # Ray pickles it back to the caller: rebuild from the fields
        return type(self), (self.worker_index, self.held, self.expected)


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


@dataclass
class PublishedWeights:
    """What the learner's rank 0 hands the rollout fleet for one weight update.

    transport: "shared_memory", "object_store" or "broadcast". buckets: the layout, in
    sending order. shared: shared_memory only, a weight_shm.SharedBufferRef (file,
    node, publish number).
    refs: object_store only, one object-store ref per bucket (inside this record, so
    Ray passes them on unresolved and a generator fetches one bucket at a time).
    source: the publishing actor's handle; for broadcast it sends the buckets
    (`broadcast_weights`), and for broadcast and shared_memory it lends an
    object-store copy to late joiners or other nodes (`weight_catch_up`). endpoint:
    (host, port) of its TCPStore for broadcast groups.
    backend: "gloo" or "nccl". timeout_s: how long a broadcast waits for a peer."""

    transport: str
    buckets: list[BucketMeta]
    refs: list[Any] | None = None
    source: Any = None
    endpoint: tuple[str, int] | None = None
    backend: str = "gloo"
    timeout_s: float = 600.0
    shared: Any = None

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return bucket_tensor_names(self.buckets)


def resolve_transport(transport: str, learner_on_gpu: bool, rollout_on_gpu: bool, colocated: bool) -> str:
    """The transport `auto` stands for, or `transport` itself once checked.

    auto -> broadcast when NCCL can carry it (learner and generators on GPUs, not
    sharing them: NCCL refuses two ranks of one group on one GPU); shared_memory when
    learner and generators are all on CPU (bench/bench_weight_sync.py, 338 MB, one
    receiver: about 2x a plain memory copy, against 4-5x for object_store and 15x for
    gloo broadcast; a generator on another node falls back to an object-store copy);
    otherwise object_store (GPU learner with CPU generators, or colocated on GPUs)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={transport!r}: must be one of {', '.join(TRANSPORTS)}")
    if transport != "auto":
        return transport
    if learner_on_gpu and rollout_on_gpu and not colocated:
        return "broadcast"
    return "shared_memory" if not learner_on_gpu and not rollout_on_gpu else "object_store"


def _aligned(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def _identity(t: "torch.Tensor") -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def plan_buckets(state: Mapping[str, "torch.Tensor"], bucket_bytes: int) -> list[BucketMeta]:
    """Group the tensors of `state` (in its order) into buckets of at most
    `bucket_bytes` each (a larger tensor gets a bucket of its own). A tensor that is
    the very same data as an earlier one (tied weights) is not sent again: its name is
    added to the earlier one's bucket, pointing at the same bytes."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket size {bucket_bytes} bytes: must be >= 1 (rollout.weight_bucket_mb > 0)")
    buckets: list[list[TensorSlot]] = []
    sizes: list[int] = []
    seen: dict[tuple, tuple[int, TensorSlot]] = {}  # tensor identity -> (bucket, its slot)
    for name, tensor in state.items():
        key = _identity(tensor)
        if key in seen:  # tied: same bytes, another name
            index, first = seen[key]
            buckets[index].append(TensorSlot(name, first.dtype, first.shape, first.offset, first.nbytes))
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or (sizes[-1] and _aligned(sizes[-1]) + nbytes > bucket_bytes):
            buckets.append([])
            sizes.append(0)
        offset = _aligned(sizes[-1])
        slot = TensorSlot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes)
        buckets[-1].append(slot)
        seen[key] = (len(buckets) - 1, slot)
        sizes[-1] = offset + nbytes
    return [BucketMeta(tuple(slots), size) for slots, size in zip(buckets, sizes)]


def _distinct(meta: BucketMeta) -> list[TensorSlot]:
    """The slots that own their bytes (a tied tensor's second name owns none)."""
    seen: set[int] = set()
    out = []
    for slot in meta.slots:
        if slot.offset not in seen:
            seen.add(slot.offset)
            out.append(slot)
    return out


def _as_bytes(tensor: "torch.Tensor") -> "torch.Tensor":
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_bucket(state: Mapping[str, "torch.Tensor"], meta: BucketMeta, device: Any = "cpu",
                out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The bucket's bytes as one flat uint8 tensor [meta.nbytes] on `device` (written
    into `out` when it fits: reusing a buffer skips the page faults of a fresh one)."""
    import torch

    flat = out if out is not None and out.numel() == meta.nbytes else \
        torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
    for slot in _distinct(meta):
        flat[slot.offset:slot.offset + slot.nbytes].copy_(_as_bytes(state[slot.name]))
    return flat


def bucket_parts(state: Mapping[str, "torch.Tensor"], meta: BucketMeta) -> list["torch.Tensor"]:
    """The bucket as one flat uint8 view per distinct tensor, without a copy: the
    object store writes each part straight into shared memory (one copy in all)."""
    return [_as_bytes(state[slot.name]) for slot in _distinct(meta)]


def packed_parts(flat: "torch.Tensor", meta: BucketMeta) -> list["torch.Tensor"]:
    """The parts of a packed bucket (views into `flat`)."""
    return [flat[slot.offset:slot.offset + slot.nbytes] for slot in _distinct(meta)]


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

    owners = _distinct(meta)
    if len(parts) != len(owners) or any(p.numel() != s.nbytes for p, s in zip(parts, owners)):
        raise ValueError(f"bucket parts of {[p.numel() for p in parts]} bytes, its layout says "
                         f"{[s.nbytes for s in owners]}")
    by_offset = {slot.offset: part for slot, part in zip(owners, parts)}
    for slot in meta.slots:
        yield slot.name, by_offset[slot.offset].view(getattr(torch, slot.dtype)).reshape(slot.shape)


def bucket_tensor_names(buckets: Iterable[BucketMeta]) -> list[str]:
    return [slot.name for b in buckets for slot in b.slots]


def tensor_from_buffer(buffer: Any) -> "torch.Tensor":
    """A uint8 tensor over a read-only array from the object store, without a copy.
    Nothing writes to it: the engine copies the values into its own
    parameters, so the read-only warning does not apply."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(buffer)


class BroadcastGroup:
    """A process group of one sender (rank 0) and receivers, for weight broadcasts.

    Built directly on a TCPStore (one per sender, reused by every group through a
    PrefixStore under the group's name), not with init_process_group: the learner's
    rank 0 already has FSDP's default group, and generators must be able to leave and
    join (a new member set means a new group). gloo moves CPU tensors; nccl needs every
    member on its own GPU."""

    def __init__(self, store: Any, name: str, rank: int, world_size: int, backend: str, timeout_s: float,
                 host: str = "127.0.0.1"):
        import torch
        import torch.distributed as dist

        self.name, self.rank, self.world_size, self.backend = name, rank, world_size, backend
        prefixed = dist.PrefixStore(f"srpo_weights/{name}", store)
        timeout = timedelta(seconds=timeout_s)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            # Connect over the address the store was reached by, not whatever the host
            # name resolves to (often an interface the other nodes cannot reach).
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.device = torch.device("cpu")
            self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
        elif backend == "nccl":  # untested here: no GPU on the development machine
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.device = torch.device("cuda", torch.cuda.current_device())
            self._pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            raise ValueError(f"weight broadcast backend {backend!r}: must be gloo or nccl")

    def broadcast(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """Rank 0 sends `tensor`, every other rank receives into it (same size)."""
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._pg.broadcast([tensor], options).wait()
        return tensor

    def receive(self, nbytes: int) -> "torch.Tensor":
        """A fresh uint8 buffer [nbytes] filled by rank 0's next broadcast. Fresh, not
        reused: the engine may still hold views of the previous bucket."""
        import torch

        return self.broadcast(torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def close(self) -> None:
        try:
            self._pg.shutdown()
        except (AttributeError, RuntimeError):  # older torch, or already torn down
            pass


def open_store(host: str, port: int, is_master: bool, timeout_s: float) -> Any:
    """The sender's TCPStore (is_master) or a receiver's connection to it."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))
