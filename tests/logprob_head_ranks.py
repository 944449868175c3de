"""One FSDP2 learner rank over gloo, started by tests/unit/test_logprob_head.py through
torch.multiprocessing (no Ray): the same train step with the full-logits path and with
the chunked log-prob head, whose head weight is read after the root's forward."""
from __future__ import annotations

import os

import torch
from learner_cases import TEMPERATURE, learner_cfg, scored_batch

from srpo_ray.learner.batch import split_for_ranks
from srpo_ray.learner.core import FSDPLearner

LENGTHS, ADVANTAGES = [7, 2, 5, 3, 6], [1.0, -1.0, 0.5, -0.5, 1.0]


def run_rank(rank: int, world_size: int, runs: list[tuple[str, int, int]], out_dir: str) -> None:
    """For each (model_dir, logprob_chunk_tokens, port): set up, train one step on this
    rank's shard (uneven micro-batch counts: one rank runs a dummy pass), then
    logprobs_of; rank 0 saves metrics, log-probs and the full state dict."""
    torch.manual_seed(0)
    for i, (model_dir, chunk, port) in enumerate(runs):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cfg = learner_cfg(logprob_chunk_tokens=chunk)
        cfg.algo.kl_coef, cfg.algo.entropy_coef = 0.1, 0.01  # reference model, entropy with a gradient
        batch = scored_batch(model_dir, LENGTHS, ADVANTAGES, seed=5)
        learner = FSDPLearner(model_dir, cfg, rank=rank, world_size=world_size)
        try:
            learner.setup()
            shard = split_for_ranks(batch, world_size)[rank]
            metrics = learner.train_step(shard, float(batch.num_response_tokens), TEMPERATURE)
            after = learner.logprobs_of(batch.input_ids, batch.attention_mask, TEMPERATURE)
            weights = learner.full_state_dict()
            if rank == 0:
                torch.save({"metrics": metrics, "logprobs": after, "weights": weights},
                           os.path.join(out_dir, f"run{i}.pt"))
        finally:
            learner.close()
