"""Helpers several transports share (pure: no Ray, torch imported where used): the
rendezvous plumbing of the group transports (a free port, a TCPStore served or reached),
the check that a streamed tensor matches its declared layout, the object-store copy that
late joiners load (kept by the publisher, or gathered on demand from the live model).

Kept here, once, so each transport file holds only what is its own.
"""
from __future__ import annotations

import socket
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import PublishedWeights

# Held (in the driver) while a call is submitted to every learner rank. Ray runs each
# rank's calls in the order one process submitted them, so under this lock every rank sees
# the collective calls (train step, publish, sends, on-demand catch-up gathers) in one
# order, whichever driver thread submits them: a collect thread's catch-up beside the
# trainer's step would otherwise gather on one rank while another trains (a hang).
LEARNER_CALLS = threading.RLock()


def to_every_rank(submit: Callable[[Any], Any], ranks: list[Any]) -> list[Any]:
    """`[submit(rank) for rank in ranks]`, submitted under LEARNER_CALLS."""
    with LEARNER_CALLS:
        return [submit(rank) for rank in ranks]


# ----------------------------------------------------------------------------- rendezvous

def free_port() -> int:
    """A TCP port free on this host now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def open_store(host: str, port: int, is_master: bool, timeout_s: float) -> Any:
    """The sender's TCPStore (is_master) or a receiver's connection to it."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


class ServedStore:
    """A TCPStore this process serves on a free port of its node, started on first use
    and kept for the process's life (every group and abort key goes through it)."""

    def __init__(self, ops: Any, timeout_s: float):
        self.ops, self.timeout_s = ops, timeout_s
        self.store: Any = None
        self.endpoint: tuple[str, int] | None = None

    def serve(self) -> tuple[str, int]:
        """Where the store is reached: (this node's IP, port)."""
        if self.endpoint is None:
            host, port = self.ops.node_ip(), free_port()
            self.store = open_store(host, port, is_master=True, timeout_s=self.timeout_s)
            self.endpoint = (host, port)
        return self.endpoint


class StoreConnection:
    """A connection to another process's TCPStore, kept while the endpoint stays the same
    (a new endpoint: the publisher restarted)."""

    def __init__(self):
        self.store: Any = None
        self.endpoint: tuple[str, int] | None = None

    def to(self, endpoint: tuple[str, int], timeout_s: float) -> Any:
        if self.store is None or self.endpoint != tuple(endpoint):
            self.store = open_store(endpoint[0], int(endpoint[1]), is_master=False, timeout_s=timeout_s)
            self.endpoint = tuple(endpoint)
        return self.store


# ----------------------------------------------------------------------------- streamed buckets

def check_slot(name: str, tensor: "torch.Tensor", slot: Any) -> None:
    """The receiver cuts the stream by the declared layout: a tensor that differs from
    it would shift every byte after it (vLLM's NCCLTrainerWeightTransferEngine checks alike)."""
    if name != slot.name or tensor.numel() * tensor.element_size() != slot.nbytes:
        raise ValueError(f"weight stream yields {name} ({tensor.numel() * tensor.element_size()} bytes) where "
                         f"its layout declared {slot.name} ({slot.nbytes} bytes)")


# ----------------------------------------------------------------------------- catch-up copies

def ask_copy(ops: Any, transport: str, published: "PublishedWeights") -> "PublishedWeights":
    """The publisher's object-store copy of `published` (its `serve_catch_up`)."""
    return ops.get(published.source.weights_call.remote(transport, "catch_up"))


def load_copy(handle: Any, copy: "PublishedWeights", version: int) -> Any:
    """A ref to generator `handle` loading catch-up copy `copy` (it returns the version held)."""
    from srpo_ray.weights.object_store import ObjectStoreTransport

    return handle.weights_call.remote(ObjectStoreTransport.name, "load", copy, version)


class CatchUpCopy:
    """Fleet side of a transport whose late joiners (and generators its transfer cannot
    reach) load an object-store copy: asked of the publisher once per publish, kept until
    the next one."""

    def __init__(self, ops: Any, transport: str):
        self.ops, self.transport = ops, transport
        self.copy: PublishedWeights | None = None

    def load(self, published: "PublishedWeights", handle: Any, version: int) -> Any:
        """A ref to `handle` loading the copy of `published`."""
        if self.copy is None or self.copy.publish_id != published.publish_id:
            self.copy = ask_copy(self.ops, self.transport, published)
        return load_copy(handle, self.copy, version)

    def drop_older(self, published: "PublishedWeights") -> None:
        """Let go of a copy of an older publish (its object-store buckets can be freed)."""
        if self.copy is not None and self.copy.publish_id != published.publish_id:
            self.copy = None


class LiveCopy:
    """Learner side (every rank) of a transport that keeps no copy of what it sent (nccl,
    cuda_ipc): a late joiner's copy is gathered on demand from the live model into the
    object store, one bucket of host memory at a time, and kept until the next publish.
    Only while the model still holds the published weights: once the learner has trained
    the copy would be a newer, unpublished version (the worker waits for the next push).
    Every rank decides alike (same steps, same publishes), so all or none gather."""

    def __init__(self):
        self.publish_id = 0
        self.copy: "PublishedWeights | None" = None

    def get(self, ops: Any, rank: int, source: "WeightSource | None", record: "PublishedWeights") -> Any:
        """Rank 0: the object-store record of `record`'s version; None elsewhere."""
        from srpo_ray.weights.object_store import ObjectStoreTransport, put_stream
        from srpo_ray.weights.transport import PublishedWeights, WeightsSupersededError

        if self.publish_id == record.publish_id:
            return self.copy
        if source is None or not source.unchanged():
            raise WeightsSupersededError(f"publish {record.publish_id}: the learner has trained since; "
                                         "the next weight push brings this worker up to date")
        refs, _ = put_stream(ops, source, record.buckets, rank)
        _release_gpu_cache()  # the gathers' blocks: a colocated engine may wake next
        self.copy = None if refs is None else PublishedWeights(
            ObjectStoreTransport.name, record.buckets, source=record.source, timeout_s=record.timeout_s,
            detail=refs, publish_id=record.publish_id)
        self.publish_id = record.publish_id
        return self.copy

    def drop(self) -> None:
        """A new publish: the old copy's object-store buckets can go."""
        self.publish_id, self.copy = 0, None


def _release_gpu_cache() -> None:
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class GatheredCatchUp:
    """Fleet side of a LiveCopy: every learner rank takes part in the gather, so all are
    asked (under LEARNER_CALLS); rank 0's answer, still a ref, is the generator's load's
    argument: nothing here waits for the gather, and a superseded copy fails the load
    (WeightsSupersededError) where the fleet looks for it."""

    def __init__(self, ops: Any, transport: str):
        self.ops, self.transport = ops, transport
        self.publish_id, self.copy_ref = 0, None

    def load(self, published: "PublishedWeights", handle: Any, version: int) -> Any:
        """A ref to `handle` loading the copy of `published` (it returns the version held)."""
        from srpo_ray.weights.object_store import ObjectStoreTransport

        return handle.weights_call.remote(ObjectStoreTransport.name, "load", self.prepare(published), version)

    def prepare(self, published: "PublishedWeights") -> Any:
        """Have the ranks gather the copy of `published` (once per publish); rank 0's ref.
        Asked right after a delivery, it is gathered before the learner's next step (each
        rank runs it first): what a fleet whose rollouts overlap training needs."""
        if self.copy_ref is None or self.publish_id != published.publish_id:
            ranks = published.sources or [published.source]
            refs = to_every_rank(lambda r: r.weights_call.remote(self.transport, "catch_up", published.publish_id),
                                 ranks)
            self.publish_id, self.copy_ref = published.publish_id, refs[0]
        return self.copy_ref
