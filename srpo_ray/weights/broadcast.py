"""The broadcast weight transport between CPU roles: learner rank 0 and the generators
form a torch.distributed gloo group of their own and each packed bucket is one
broadcast. (Between GPU roles `broadcast` means nccl.py: vLLM's own NCCL transfer.)

The group is built on a TCPStore (one per sender, reused by every group through a
PrefixStore under the group's name), not with init_process_group: the learner's rank 0
already has its FSDP group, and generators must be able to leave and join (a new member
set means a new group). The layout travels through Ray first, then the bytes. A late
joiner gets an object-store copy of the packed buckets (a group change would need every
member, and the others may be busy generating).

Measured (bench/bench_weight_sync.py, 338 MB, 2 shared cores): 14x a plain memory copy.
`BroadcastGroup` also speaks NCCL (one GPU per member), which tests/gpu/check_device.sh
uses to check NCCL on a machine without vLLM.
"""
from __future__ import annotations

import itertools
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from srpo_ray.weights.common import CatchUpCopy, ServedStore, StoreConnection
from srpo_ray.weights.layout import laid_out_names, pack_bucket, plan_stream, unpack_bucket
from srpo_ray.weights.transport import PublishedWeights, WeightTransport, outcomes

if TYPE_CHECKING:
    import torch

    from srpo_ray.weights.source import WeightSource
    from srpo_ray.weights.transport import Receiver


class BroadcastGroup:
    """A process group of one sender (rank 0) and receivers, for weight broadcasts.
    gloo moves CPU tensors; nccl needs every member on its own GPU."""

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
        elif backend == "nccl":
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
        # ProcessGroup.shutdown exists in every torch this project supports (>= 2.6);
        # a RuntimeError means the group is already torn down. Nothing else is swallowed.
        try:
            self._pg.shutdown()
        except RuntimeError:
            pass


class BroadcastTransport(WeightTransport):
    """Learner side: the buckets are packed into flat host buffers, reused from one
    publish to the next, that stay here until `serve_send` broadcasts them to the group
    the fleet formed (`serve_open`). Generation side: `receive_join`, then `load`
    receives each bucket and loads it as it arrives. Fleet side: forms a new group when
    the member set changed, then sends."""

    name = "broadcast"
    takes_full_state_on_cpu = True

    def __init__(self, ops, settings=None):
        super().__init__(ops, settings)
        self._packed: list["torch.Tensor"] = []
        self._published: PublishedWeights | None = None
        self._store = ServedStore(ops, self.settings.timeout_s)  # learner side
        self._sender_store = StoreConnection()  # generation side
        self._group: BroadcastGroup | None = None
        self._copy: PublishedWeights | None = None
        # fleet side: the late joiners' copy; the current group, who is in it, under which name
        self._fleet_copy = CatchUpCopy(ops, self.name)
        self._prefix, self._count = uuid.uuid4().hex[:8], itertools.count()
        self._group_name: str | None = None
        self._group_key: tuple = ()
        self._publishes = itertools.count(1)

    # ------------------------------------------------------------------ learner side
    def publish(self, source: "WeightSource") -> PublishedWeights | None:
        buckets = plan_stream(source.specs, self.settings.bucket_bytes)
        state = source.state_dict()  # every rank takes part; rank 0 holds the result
        if state is None:
            return None
        # the layout is the same every time: refill the last buffers (no fresh page faults)
        old = self._packed + [None] * len(buckets)
        self._packed = [pack_bucket(state, meta, "cpu", out=old[i]) for i, meta in enumerate(buckets)]
        self._copy = None
        self._published = PublishedWeights(self.name, buckets, source=self.ops.current_actor(),
                                           timeout_s=self.settings.timeout_s, detail=self._store.serve(),
                                           publish_id=next(self._publishes))
        return self._published

    def serve_open(self, name: str, world_size: int) -> None:
        """Be rank 0 of group `name` (world_size = 1 + receivers); the receivers join at
        the same time (`receive_join`)."""
        host = self._store.serve()[0]
        if self._group is not None:
            self._group.close()
        self._group = None
        self._group = BroadcastGroup(self._store.store, name, 0, world_size, "gloo", self.settings.timeout_s,
                                     host=host)

    def serve_send(self, name: str) -> int:
        """Send the buckets of the last publish to group `name`, in order; bytes sent."""
        if self._group is None or self._group.name != name:
            raise RuntimeError(f"weight group {name!r} is not open here (open: "
                               f"{self._group.name if self._group else None!r})")
        if not self._packed:
            raise RuntimeError("nothing to broadcast: publish broadcast weights first")
        for flat in self._packed:
            self._group.broadcast(flat)
        return sum(flat.numel() for flat in self._packed)

    def serve_catch_up(self) -> PublishedWeights:
        """The last publish as object-store buckets (put once per publish, on first request)."""
        from srpo_ray.weights.object_store import put_buckets

        if self._published is None:
            raise RuntimeError("no weights published yet")
        if self._copy is None:
            self._copy = put_buckets(self.ops, self._published, self._packed)
        return self._copy

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    # ------------------------------------------------------------------ generation side
    def receive_join(self, receiver: "Receiver", endpoint: tuple[str, int], name: str, rank: int,
                     world_size: int, timeout_s: float) -> None:
        """Become `rank` (>= 1) of group `name` whose sender serves a TCPStore at
        `endpoint`; replaces any group joined before. Every member must call this at the
        same time (the group forms when all have arrived)."""
        store = self._sender_store.to(endpoint, timeout_s)
        if self._group is not None:
            self._group.close()
        self._group = None
        self._group = BroadcastGroup(store, name, rank, world_size, "gloo", timeout_s, host=self.ops.node_ip())

    def load(self, published: PublishedWeights, version: int, receiver: "Receiver", group_name: str = "") -> int:
        group = self._group
        if group is None or group.name != group_name:
            raise RuntimeError(f"generation worker {receiver.worker_index} is not in weight group {group_name!r} "
                               f"(it is in {group.name if group else None!r}); join first")

        def stream():
            for meta in published.buckets:
                yield from unpack_bucket(group.receive(meta.nbytes), meta)
        # with their layout: a TP engine writes its reload file bucket by bucket
        return receiver.load_stream(laid_out_names(published.buckets), stream(), version)

    # ------------------------------------------------------------------ fleet side
    def deliver(self, published: PublishedWeights, members: list[Any], version: int) -> list[Any]:
        if not members:
            return []
        self._fleet_copy.drop_older(published)
        key = (published.detail, tuple(members))  # Members compare by identity
        if key != self._group_key:
            name = f"{self._prefix}-{next(self._count)}"
            world = len(members) + 1
            joins = [m.handle.weights_call.remote(self.name, "join", published.detail, name, rank + 1, world,
                                                  published.timeout_s) for rank, m in enumerate(members)]
            opened = published.source.weights_call.remote(self.name, "open", name, world)
            joined = outcomes(self.ops, joins)
            if any(isinstance(out, BaseException) for out in joined):
                self._group_key = ()
                self.ops.wait([opened], num_returns=1, timeout=published.timeout_s)
                return joined
            self.ops.get(opened)
            self._group_name, self._group_key = name, key
        sent = published.source.weights_call.remote(self.name, "send", self._group_name)
        results = outcomes(self.ops, [m.handle.weights_call.remote(self.name, "load", published, version,
                                                                    self._group_name) for m in members])
        failed = any(isinstance(out, BaseException) for out in results)
        try:
            self.ops.get(sent)
        except Exception:
            if not failed:
                raise
        if failed:
            self._group_key = ()  # the group is broken for everyone: form a new one next time
        return results

    def catch_up(self, published: PublishedWeights, handle: Any, version: int) -> Any:
        """A late joiner gets an object-store copy of the packed buckets."""
        return self._fleet_copy.load(published, handle, version)
