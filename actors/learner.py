"""Learner rank as a Ray actor: a thin shell around srpo_ray.learner_core.FSDPLearner.

    group = create_learner_group(cfg, model_path)            # actors + process group
    metrics = group.train(batch, temperature)
    ref = group.state_dict_ref()                              # rank 0's full state dict

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
from srpo_ray.learner_group import LearnerGroup


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerRankImpl:
    def __init__(self, model_path: str, cfg: SRPOConfig, rank: int, world_size: int,
                 master_addr: str | None = None, master_port: int | None = None):
        """master_addr/master_port: rank 0's endpoint; rank 0 may leave them None to
        pick its own (read it back with get_master_endpoint())."""
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

    def get_master_endpoint(self) -> tuple[str, int]:
        return self.master_addr, self.master_port

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def ping(self) -> str:
        return "pong"

    def setup(self) -> None:
        self.learner.setup()

    def train_step(self, shard: TrainBatch, loss_denominator: float, temperature: float) -> dict:
        return self.learner.train_step(shard, loss_denominator, temperature)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.learner.full_state_dict()

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.learner.load_checkpoint(directory)

    def logprobs_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        return self.learner.logprobs_of(input_ids, attention_mask, temperature)


LearnerRank = ray.remote(LearnerRankImpl)


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
