"""Helpers several transports share (pure: no Ray, torch imported where used): the
rendezvous plumbing of the group transports (a free port, a TCPStore served or reached),
the check that a streamed tensor matches its declared layout, rank 0's host copy of a
streamed version, and the object-store copy that late joiners load.

Kept here, once, so each transport file holds only what is its own.
"""
from __future__ import annotations

import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.transport import PublishedWeights


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


class HostCopy:
    """Rank 0's copy of the last version in host memory (pinned, reused), filled from
    the GPU buckets as they are sent: what late joiners and replacements load."""

    def __init__(self):
        self.flats: list["torch.Tensor"] = []

    def slot(self, index: int, nbytes: int) -> "torch.Tensor":
        import torch

        while len(self.flats) <= index:
            self.flats.append(torch.empty(0, dtype=torch.uint8))
        if self.flats[index].numel() != nbytes:
            self.flats[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self.flats[index]

    def put(self, ops: Any, record: "PublishedWeights") -> "PublishedWeights":
        """An object-store copy of the version `record` lays out (its buckets, in order)."""
        from srpo_ray.weights.object_store import put_buckets

        return put_buckets(ops, record, self.flats[:len(record.buckets)])


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
