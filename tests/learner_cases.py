"""Learner test cases shared by tests/unit/test_learner.py (in process) and the Ray-tier
learner tests (tests/ray/test_learner_ray.py, test_learner_kl.py, test_learner_load.py):
a small learner config, batches whose rollout log-probs are the model's own, and the
tolerance two world sizes agree to."""
from __future__ import annotations

import socket

import torch

from srpo_ray.config.schema import SRPOConfig
from srpo_ray.learner.batch import TrainBatch
from srpo_ray.learner.plan import build_train_batch
from srpo_ray.records import Prompt, RewardResult, RolloutGroup, Sample, ScoredGroup

TEMPERATURE = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_cfg(**learner) -> SRPOConfig:
    cfg = SRPOConfig()
    cfg.optim.lr = 1e-2
    cfg.optim.grad_clip = 1.0
    cfg.optim.eps = 1e-3  # see CROSS_WORLD_ATOL
    cfg.learner.micro_batch_size = 2
    cfg.learner.collective_timeout_s = 60  # a rank left waiting fails instead of hanging
    cfg.learner.cpus_per_rank = 1
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


def scored_batch(model_path: str, lengths: list[int], advantages: list[float], seed: int) -> TrainBatch:
    """A batch of random token sequences whose 'rollout' log-probs are the initial
    model's own (at TEMPERATURE), computed here with plain HF."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    groups, advs = [], []
    for i, (n, a) in enumerate(zip(lengths, advantages)):
        prompt = torch.randint(3, 500, (2 + i % 3,), generator=g).tolist()
        resp = torch.randint(3, 500, (n,), generator=g).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + resp])).logits
        lp = torch.log_softmax(logits[0, :-1] / TEMPERATURE, -1).gather(-1, torch.tensor(prompt + resp)[1:, None])
        sample = Sample(token_ids=resp, logprobs=lp[len(prompt) - 1:, 0].tolist(), text="", finish_reason="stop")
        groups.append(ScoredGroup(RolloutGroup.of(Prompt(f"p{i}", "math", [], "1"), prompt, [sample], 0),
                                  [RewardResult(a, a > 0)]))
        advs.append([a])
    return build_train_batch(groups, advs, pad_token_id=0)


# Different rank counts sum gradients in a different order (rounding ~1e-7). 1e-5 is
# a thousandth of the lr (1e-2), the size of a real update: a wrong gradient differs by
# ~lr. (optim.eps=1e-3 in these tests keeps Adam from blowing the rounding of ~zero
# gradients, e.g. the key bias's, which is exactly 0, up to lr-sized steps.)
CROSS_WORLD_ATOL = 1e-5


def assert_same_weights(a: dict, b: dict, atol: float = CROSS_WORLD_ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
