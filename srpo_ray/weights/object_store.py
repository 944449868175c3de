"""The object_store weight transport: learner rank 0 puts each bucket into Ray's object
store as a list of flat byte views, one per tensor (Ray copies them straight into shared
memory); every generator fetches them, one bucket at a time (zero-copy on the same
node, one pull per node otherwise), each once the one before is loaded. Also the form
every catch-up copy takes (a late joiner, a generator on another node than a
shared-memory file).

Measured (bench/bench_weight_sync.py, 338 MB, 2 shared cores): 4-12x a plain memory
copy, because every publish faults in fresh shared memory; shared_memory is the CPU
default for that reason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from srpo_ray.weights.layout import (
    BucketMeta,
    as_bytes,
    bucket_parts,
    distinct_slots,
    laid_out_names,
    packed_parts,
    plan_stream,
    tensor_from_buffer,
    unpack_parts,
)
from srpo_ray.weights.transport import PublishedWeights, WeightTransport

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import Receiver


def put_buckets(ops: Any, published: PublishedWeights, flats: list["torch.Tensor"]) -> PublishedWeights:
    """An object-store copy of packed buckets (`flats`, one flat uint8 tensor each, any
    device) as an object_store record with the same layout."""
    refs = [ops.put([part.cpu().numpy() for part in packed_parts(flat, meta)])
            for flat, meta in zip(flats, published.buckets)]
    return PublishedWeights(ObjectStoreTransport.name, published.buckets, source=published.source,
                            timeout_s=published.timeout_s, detail=refs, publish_id=published.publish_id)


def put_stream(ops: Any, source: "WeightSource", buckets: list[BucketMeta], rank: int,
               staging: "torch.Tensor | None" = None) -> tuple[list[Any] | None, "torch.Tensor | None"]:
    """Gather one tensor at a time (every rank iterates), copy it to a reused host
    bucket, put each full bucket: host memory of one bucket, not the model. Returns
    (the buckets' refs on rank 0, None elsewhere; the staging bucket, for reuse)."""
    import torch

    owners = [(i, s, s is distinct_slots(meta)[-1]) for i, meta in enumerate(buckets) for s in distinct_slots(meta)]
    size = max((b.nbytes for b in buckets), default=0)
    if rank == 0 and (staging is None or staging.numel() < size):
        staging = torch.empty(size, dtype=torch.uint8)
    refs: list[Any] = []
    for (index, slot, last), (_, tensor) in zip(owners, source.tensors()):
        if rank != 0:
            continue  # this rank only joins the gathers
        staging[slot.offset:slot.offset + slot.nbytes].copy_(as_bytes(tensor))
        if last:
            meta = buckets[index]
            refs.append(ops.put([p.numpy() for p in packed_parts(staging[:meta.nbytes], meta)]))
    return (refs if rank == 0 else None), staging


class ObjectStoreTransport(WeightTransport):
    name = "object_store"
    takes_full_state_on_cpu = True

    def __init__(self, ops, settings=None):
        super().__init__(ops, settings)
        self._staging: "torch.Tensor | None" = None  # one host bucket, reused (streamed sources)
        self._count = 0

    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        buckets = plan_stream(source.specs, self.settings.bucket_bytes)
        if source.in_hand:  # views of the tensors themselves: the put is the one copy
            state = source.state_dict()
            refs = [self.ops.put([part.numpy() for part in bucket_parts(state, meta)]) for meta in buckets]
        else:
            refs = self._put_streamed(source, buckets)
            if refs is None:
                return None
        self._count += 1
        return PublishedWeights(self.name, buckets, source=self.ops.current_actor(),
                                timeout_s=self.settings.timeout_s, detail=refs, publish_id=self._count)

    def _put_streamed(self, source: "WeightSource", buckets: list[BucketMeta]) -> list[Any] | None:
        refs, self._staging = put_stream(self.ops, source, buckets, self.settings.rank, self._staging)
        return refs

    def load(self, published: PublishedWeights, version: int, receiver: "Receiver", *extra: Any) -> int:
        """Fetch the buckets one at a time, each when the receiver has taken the one
        before (nothing fetched ahead: a node never pulls the whole model into its object
        store), and load them. The names carry every tensor's dtype and shape, so a
        tensor-parallel engine writes its reload file bucket by bucket as they arrive."""
        refs = published.detail
        if refs is None or len(refs) != len(published.buckets):
            raise ValueError("object_store weights need one object-store ref per bucket")

        def stream():
            for meta, ref in zip(published.buckets, refs):
                yield from unpack_parts([tensor_from_buffer(part) for part in self.ops.get(ref)], meta)
        return receiver.load_stream(laid_out_names(published.buckets), stream(), version)
