"""One learner rank set up from a model folder (tests/unit/test_weight_files.py spawns
them): what every rank holds after set-up, saved for the test to compare with
from_pretrained's values."""
from __future__ import annotations

import os

import torch
from learner_cases import learner_cfg

from srpo_ray.learner.core import FSDPLearner


def run_rank(rank: int, world_size: int, runs: list[tuple[str, int]], out_dir: str) -> None:
    """For each (model_dir, port): set up a learner with a reference model
    (algo.kl_coef > 0); rank 0 saves the policy's and the reference's full state dicts,
    every rank its buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for i, (model_dir, port) in enumerate(runs):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cfg = learner_cfg()
        cfg.algo.kl_coef = 0.1
        learner = FSDPLearner(model_dir, cfg, rank=rank, world_size=world_size)
        try:
            learner.setup()
            policy = learner.full_state_dict()
            ref = get_model_state_dict(learner.ref_model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
            buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
            if rank == 0:
                torch.save({"policy": policy, "ref": ref}, os.path.join(out_dir, f"run{i}.pt"))
            torch.save(buffers, os.path.join(out_dir, f"run{i}_buffers{rank}.pt"))
        finally:
            learner.close()
