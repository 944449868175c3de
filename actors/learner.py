"""Learner rank as a Ray actor: a thin shell around srpo_ray.learner.core.FSDPLearner.

    group = create_learner_group(cfg, model_path)            # srpo_ray/runtime/learner_group.py
    metrics = group.train(batch, temperature)
    published = group.publish_weights()                      # rank 0's record, for the rollout fleet

Weights for the generators: `publish_weights()` on every rank (the gather is
collective) returns, on rank 0, a PublishedWeights record (srpo_ray/weights/); the
rollout fleet delivers it. The fleet's calls to the transports reach every rank through
its one weight endpoint, `weights_call` (the WeightServing mixin).

Rank 0 picks the rendezvous endpoint (its node's IP and a free port) when created;
the other ranks are created with it. On GPUs Ray gives each actor its own device
through CUDA_VISIBLE_DEVICES, so every rank uses local device 0.
"""
from __future__ import annotations

import os
from typing import Any

import ray
import torch

from actors.ray_ops import RayOps
from srpo_ray.config.schema import SRPOConfig, resolve_dtype
from srpo_ray.learner.plan import TrainShard, fetch_and_build
from srpo_ray.telemetry.console import redirect_actor_output
from srpo_ray.weights.common import free_port
from srpo_ray.weights.endpoints import WeightSender
from srpo_ray.weights.source import StateDictSource
from srpo_ray.weights.transport import PublishedWeights, SenderSettings, resolve_for

MB = 1 << 20


def sender_for(cfg: SRPOConfig, rank: int = 0, world_size: int = 1) -> WeightSender:
    """The weight sender `cfg` asks for (rollout.weight_transport resolved here)."""
    settings = SenderSettings(RayOps(), int(cfg.rollout.weight_bucket_mb * MB),
                              float(cfg.learner.collective_timeout_s), rank, world_size,
                              cfg.rollout.tensor_parallel_size)
    return WeightSender(resolve_for(cfg), settings)


class WeightServing:
    """The weight endpoint of whoever publishes (learner ranks, a WeightSource): the
    fleet's calls reach the transports through `weights_call`."""

    sender: WeightSender

    def weights_call(self, transport: str, op: str, *args: Any) -> Any:
        return self.sender.call(transport, op, *args)

    def close_weights(self) -> None:
        """Remove shared-memory files, leave groups (also done at a normal process exit)."""
        self.sender.close()

    def _weights_copied(self) -> None:
        """Before the weights change in place: a shared-memory publish copies them in
        the background, and on one CPU rank the gathered state may be the parameters
        themselves."""
        self.sender.wait()


class WeightSource(WeightServing):
    """Publishes a given state dict like a learner's rank 0 does, without FSDP: for
    benchmarks and tests of the transports, or to serve weights from a file."""

    def __init__(self, transport: str, bucket_bytes: int, timeout_s: float = 600.0):
        self.sender = WeightSender(transport, SenderSettings(RayOps(), bucket_bytes, timeout_s))

    def publish(self, state: dict[str, torch.Tensor], transport: str | None = None) -> PublishedWeights:
        self.sender.wait()
        return self.sender.publish(StateDictSource(state), transport)


class LearnerRankImpl(WeightServing):
    def __init__(self, model_path: str, cfg: SRPOConfig, rank: int, world_size: int,
                 master_addr: str | None = None, master_port: int | None = None):
        """master_addr/master_port: rank 0's endpoint; rank 0 may leave them None to
        pick its own (read it back with get_master_endpoint())."""
        redirect_actor_output()  # srpo_ray/telemetry/console.py
        from srpo_ray.learner.core import FSDPLearner

        if master_addr is None or master_port is None:
            if rank != 0:
                raise ValueError(f"learner rank {rank} needs master_addr and master_port "
                                 f"(from rank 0's get_master_endpoint())")
            master_addr, master_port = ray.util.get_node_ip_address(), free_port()
        self.master_addr, self.master_port = master_addr, int(master_port)
        os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(max(1, int(cfg.learner.cpus_per_rank)))
        self.learner = FSDPLearner(model_path, cfg, rank, world_size)
        self.sender = sender_for(cfg, rank, world_size)
        # what the generators run: published weights are cast to it on the learner's device
        self.wire_dtype = getattr(torch, resolve_dtype(cfg.model.dtype, cfg.rollout.gpus_per_worker > 0))

    def get_master_endpoint(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def ping(self) -> str:
        return "pong"

    def setup(self) -> None:
        self.learner.setup()

    def train_step(self, shard: TrainShard, loss_denominator: float, temperature: float) -> dict:
        """This rank's part of one update: its rows' tokens are fetched here, by reference
        from the object store (not through the driver), and padded into its batch."""
        self._weights_copied()
        batch = fetch_and_build(shard, ray.get)
        return self.learner.train_step(batch, loss_denominator, temperature)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.learner.full_state_dict()

    def publish_weights(self, transport: str | None = None) -> PublishedWeights | None:
        """Collective (every rank joins the gather): the weights for the generators, a
        record on rank 0, None on the others. transport: override rollout.weight_transport.
        What is published from (a full state dict, or parameters streamed in the engine's
        dtype) is the transport's call (srpo_ray/weights/endpoints.py publish_model)."""
        self._weights_copied()
        return self.sender.publish_model(self.learner, self.wire_dtype, transport)

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
