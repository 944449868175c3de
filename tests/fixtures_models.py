"""Shared model helpers: a small rollout config for test engines and an HF reference for
log-probs. (The model fixtures themselves, tiny_model_dir and friends: tests/conftest.py.)"""
from __future__ import annotations

import torch

from srpo_ray.config.schema import RolloutConfig

SMALL_KV_BYTES = 32 << 20  # tiny models need little KV cache; keeps test engines small
# A fixed prompt and response whose log-probs show which weights a worker holds.
PROMPT, RESPONSE = list(range(20, 40)), [9, 99, 199, 299, 399, 7]


def small_rollout_config(**overrides) -> RolloutConfig:
    cfg = RolloutConfig(kv_cache_memory_bytes=SMALL_KV_BYTES, cpus_per_worker=1.0, seed=0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def hf_logprobs(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int],
                temperature: float = 1.0) -> torch.Tensor:
    """Reference log p(response[k] | prompt + response[:k]) from an HF forward with
    logits / temperature: shape [len(response_ids)]."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def perturbed_state_dict(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add seeded Gaussian noise to every parameter of `model` in place and return its
    full state dict (tied weights appear under both names, as a learner sends them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_workers_hold(handles: list, model: torch.nn.Module, version: int, atol: float) -> None:
    """Every generation worker holds `version` and scores PROMPT/RESPONSE like an HF
    forward of `model` (within atol)."""
    import ray  # only the Ray and GPU tiers call this

    ref = hf_logprobs(model, PROMPT, RESPONSE)
    for handle in handles:
        assert ray.get(handle.version.remote()) == version
        got = torch.tensor(ray.get(handle.token_logprobs.remote(PROMPT, RESPONSE)))
        assert torch.allclose(got, ref, atol=atol), (got, ref)
