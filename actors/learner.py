"""Learner rank as a Ray actor: a thin shell around srpo_ray.learner_core.FSDPLearner.

    group = create_learner_group(cfg, model_path)            # actors + process group
    metrics = group.train(batch, temperature)
    ref = group.state_dict_ref()                              # rank 0's full state dict

Weights for the generators: `publish_weights()` on every rank (the gather is
collective) returns, on rank 0, a PublishedWeights record of buckets in a shared-memory
file, in the object store or ready to broadcast (srpo_ray/weight_sync.py); the rollout
fleet delivers it. Rank 0 also answers the fleet's calls (`open_weight_group`,
`broadcast_weights`, `weight_catch_up`, `close_weights`: the WeightServing mixin),
through its WeightPublisher.

Rank 0 picks the rendezvous endpoint (its node's IP and a free port) when created;
the other ranks are created with it. On GPUs Ray gives each actor its own device
through CUDA_VISIBLE_DEVICES, so every rank uses local device 0.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import ray
import torch

from srpo_ray.batch import TrainBatch
from srpo_ray.config import SRPOConfig
from srpo_ray.console import redirect_actor_output
from srpo_ray.runtime.learner_group import LearnerGroup
from srpo_ray.weight_shm import SharedWeightBuffer
from srpo_ray.weight_sync import (BroadcastGroup, PublishedWeights, bucket_parts, open_store, pack_bucket,
                                  packed_parts, plan_buckets, resolve_transport)

MB = 1 << 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class WeightPublisher:
    """The sending side of weight sync, kept by the actor that owns the weights
    (learner rank 0, or a WeightSource).

    shared_memory: the buckets are copied (in the background, see
    srpo_ray/weight_shm.py) into this actor's /dev/shm file, reused from one publish
    to the next; `close` removes it. object_store: every bucket goes into Ray's object
    store as a list of per-tensor byte views (one copy, into shared memory); the refs
    are owned by this actor and live while the fleet holds the record. broadcast: the
    buckets are packed into flat buffers (reused from one publish to the next) that
    stay here until `broadcast` sends them to the group the fleet formed. For late
    joiners of a broadcast and for generators on other nodes than a shared-memory
    file, `catch_up` makes an object-store copy on first request."""

    def __init__(self, transport: str, bucket_bytes: int, backend: str = "gloo", timeout_s: float = 600.0):
        if transport not in ("shared_memory", "object_store", "broadcast"):
            raise ValueError(f"weight transport {transport!r}: resolve `auto` first (resolve_transport)")
        self.transport, self.bucket_bytes = transport, int(bucket_bytes)
        self.backend, self.timeout_s = backend, float(timeout_s)
        self._packed: list[torch.Tensor] = []
        self._published: PublishedWeights | None = None
        self._catch_up: PublishedWeights | None = None
        self._store: Any = None
        self._endpoint: tuple[str, int] | None = None
        self._group: BroadcastGroup | None = None
        self._shared: SharedWeightBuffer | None = None

    def publish(self, state: dict[str, torch.Tensor], transport: str | None = None) -> PublishedWeights:
        """Bucket `state` (HF names, CPU tensors) and make it available to the fleet."""
        transport = transport or self.transport
        buckets = plan_buckets(state, self.bucket_bytes)
        me = ray.get_runtime_context().current_actor
        self._catch_up = None
        if transport == "shared_memory":
            self._packed = []
            if self._shared is None:
                self._shared = SharedWeightBuffer(ray.get_runtime_context().get_node_id(), self.timeout_s)
            # returns while the copy goes on: generators load each tensor as it lands
            self._published = PublishedWeights("shared_memory", buckets, source=me, timeout_s=self.timeout_s,
                                               shared=self._shared.write(state, buckets))
        elif transport == "object_store":
            self._packed = []
            # a list of per-tensor byte views: Ray copies each straight into shared memory
            refs = [ray.put([part.numpy() for part in bucket_parts(state, meta)]) for meta in buckets]
            self._published = PublishedWeights("object_store", buckets, refs=refs, source=me)
        else:
            device = "cuda" if self.backend == "nccl" else "cpu"
            # the layout is the same every time: refill the last buffers (no fresh page faults)
            old = self._packed + [None] * len(buckets)
            self._packed = [pack_bucket(state, meta, device, out=old[i]) for i, meta in enumerate(buckets)]
            self._published = PublishedWeights("broadcast", buckets, source=me, endpoint=self._store_endpoint(),
                                               backend=self.backend, timeout_s=self.timeout_s)
        return self._published

    def _store_endpoint(self) -> tuple[str, int]:
        if self._endpoint is None:
            host, port = ray.util.get_node_ip_address(), _free_port()
            self._store = open_store(host, port, is_master=True, timeout_s=self.timeout_s)
            self._endpoint = (host, port)
        return self._endpoint

    def open_group(self, name: str, world_size: int) -> None:
        """Be rank 0 of broadcast group `name` (world_size = 1 + receivers); the
        receivers join at the same time (GenerationWorker.join_weight_group)."""
        host = self._store_endpoint()[0]
        if self._group is not None:
            self._group.close()
        self._group = None
        self._group = BroadcastGroup(self._store, name, 0, world_size, self.backend, self.timeout_s, host=host)

    def broadcast(self, name: str) -> int:
        """Send the buckets of the last publish to group `name`, in order; returns bytes sent."""
        if self._group is None or self._group.name != name:
            raise RuntimeError(f"weight group {name!r} is not open here (open: "
                               f"{self._group.name if self._group else None!r})")
        if not self._packed:
            raise RuntimeError("nothing to broadcast: publish broadcast weights first")
        for flat in self._packed:
            self._group.broadcast(flat)
        return sum(flat.numel() for flat in self._packed)

    def catch_up(self) -> PublishedWeights:
        """The last published weights as object-store buckets, for a generator that
        joins between broadcasts (put once per publish, on first request)."""
        if self._published is None:
            raise RuntimeError("no weights published yet")
        if self._published.transport == "object_store":
            return self._published
        if self._catch_up is None:
            pub = self._published
            flats = self._shared.bucket_bytes(pub.shared, pub.buckets) if pub.transport == "shared_memory" \
                else self._packed
            refs = [ray.put([part.cpu().numpy() for part in packed_parts(flat, meta)])
                    for flat, meta in zip(flats, pub.buckets)]
            self._catch_up = PublishedWeights("object_store", self._published.buckets, refs=refs,
                                              source=self._published.source)
        return self._catch_up

    def wait(self) -> None:
        """Until the last shared-memory publish is copied (its state may then change)."""
        if self._shared is not None:
            self._shared.wait()

    def close(self) -> None:
        """Remove the shared-memory file (if any) and leave the broadcast group."""
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._group is not None:
            self._group.close()
            self._group = None


def publisher_for(cfg: SRPOConfig) -> WeightPublisher:
    """The WeightPublisher `cfg` asks for (rollout.weight_transport resolved here)."""
    learner_gpu = cfg.learner.gpus_per_rank > 0
    rollout_gpu = cfg.rollout.gpus_per_worker > 0
    transport = resolve_transport(cfg.rollout.weight_transport, learner_gpu, rollout_gpu, cfg.cluster.colocate)
    backend = "nccl" if learner_gpu and rollout_gpu else "gloo"
    return WeightPublisher(transport, int(cfg.rollout.weight_bucket_mb * MB), backend,
                           timeout_s=cfg.learner.collective_timeout_s)


class WeightServing:
    """The calls the rollout fleet makes on whoever publishes weights (learner rank 0,
    a WeightSource): passed through to `self.publisher` (None on other learner ranks)."""

    publisher: WeightPublisher | None

    def open_weight_group(self, name: str, world_size: int) -> None:
        self._weight_publisher().open_group(name, world_size)

    def broadcast_weights(self, name: str) -> int:
        return self._weight_publisher().broadcast(name)

    def weight_catch_up(self) -> PublishedWeights:
        return self._weight_publisher().catch_up()

    def close_weights(self) -> None:
        """Remove the shared-memory weight file (also done at a normal process exit)."""
        if self.publisher is not None:
            self.publisher.close()

    def _weights_copied(self) -> None:
        """Before the weights change in place: a shared-memory publish copies them in
        the background, and on one CPU rank the gathered state may be the parameters
        themselves."""
        if self.publisher is not None:
            self.publisher.wait()

    def _weight_publisher(self) -> WeightPublisher:
        if self.publisher is None:
            raise RuntimeError("only learner rank 0 publishes weights: send weight calls to rank 0")
        return self.publisher


class WeightSource(WeightServing):
    """Publishes a given state dict like a learner's rank 0 does, without FSDP: for
    benchmarks and tests of the transports, or to serve weights from a file."""

    def __init__(self, transport: str, bucket_bytes: int, backend: str = "gloo", timeout_s: float = 600.0):
        self.publisher = WeightPublisher(transport, bucket_bytes, backend, timeout_s)

    def publish(self, state: dict[str, torch.Tensor], transport: str | None = None) -> PublishedWeights:
        return self.publisher.publish(state, transport)


class LearnerRankImpl(WeightServing):
    def __init__(self, model_path: str, cfg: SRPOConfig, rank: int, world_size: int,
                 master_addr: str | None = None, master_port: int | None = None):
        """master_addr/master_port: rank 0's endpoint; rank 0 may leave them None to
        pick its own (read it back with get_master_endpoint())."""
        redirect_actor_output()  # srpo_ray/console.py
        from srpo_ray.learner_core import FSDPLearner

        if master_addr is None or master_port is None:
            if rank != 0:
                raise ValueError(f"learner rank {rank} needs master_addr and master_port "
                                 f"(from rank 0's get_master_endpoint())")
            master_addr, master_port = ray.util.get_node_ip_address(), _free_port()
        self.master_addr, self.master_port = master_addr, int(master_port)
        os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(cfg.learner.cpus_per_rank)))
        self.learner = FSDPLearner(model_path, cfg, rank, world_size)
        self.publisher = publisher_for(cfg) if rank == 0 else None

    def get_master_endpoint(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def ping(self) -> str:
        return "pong"

    def setup(self) -> None:
        self.learner.setup()

    def train_step(self, shard: TrainBatch, loss_denominator: float, temperature: float) -> dict:
        self._weights_copied()
        return self.learner.train_step(shard, loss_denominator, temperature)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.learner.full_state_dict()

    def publish_weights(self, transport: str | None = None) -> PublishedWeights | None:
        """Collective (every rank joins the gather): the weights as buckets for the
        generators, on rank 0; None on the others. transport: override
        rollout.weight_transport (shared_memory, object_store or broadcast)."""
        state = self.learner.full_state_dict()
        if state is None:
            return None
        return self.publisher.publish(state, transport)

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self._weights_copied()
        self.learner.load_checkpoint(directory)

    def logprobs_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        return self.learner.logprobs_of(input_ids, attention_mask, temperature)


LearnerRank = ray.remote(LearnerRankImpl)
WeightSourceActor = ray.remote(WeightSource)


def create_learner_group(cfg: SRPOConfig, model_path: str, num_ranks: int | None = None,
                         actor_options: Callable[[int], dict[str, Any]] | None = None,
                         setup: bool = True) -> LearnerGroup:
    """Create `num_ranks` (default learner.num_ranks) LearnerRank actors, rank 0 first
    (it picks the rendezvous endpoint), and set up the FSDP2 process group.

    actor_options(rank) -> `.options(...)` kwargs for that rank, e.g.
    `lambda r: placement.actor_options("learner", r)` from cluster.ray_placement;
    default: num_cpus=learner.cpus_per_rank, num_gpus=learner.gpus_per_rank."""
    world_size = cfg.learner.num_ranks if num_ranks is None else num_ranks
    if world_size < 1:
        raise ValueError(f"learner.num_ranks must be >= 1, got {world_size}")
    if actor_options is None:
        def actor_options(rank: int) -> dict[str, Any]:
            return {"num_cpus": cfg.learner.cpus_per_rank, "num_gpus": cfg.learner.gpus_per_rank}

    rank0 = LearnerRank.options(**actor_options(0)).remote(model_path, cfg, 0, world_size)
    addr, port = ray.get(rank0.get_master_endpoint.remote())
    handles = [rank0] + [LearnerRank.options(**actor_options(r)).remote(model_path, cfg, r, world_size,
                                                                        addr, port)
                         for r in range(1, world_size)]
    group = LearnerGroup(handles, cfg.algo.loss_agg)
    if setup:
        group.setup()
    return group
