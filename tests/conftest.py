"""Shared test fixtures: one local Ray for the whole session (re-started only after a
test that needed a multi-node cluster of its own), tiny models built once."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (scripted_model, ...)

LOCAL_RAY_CPUS = 4  # fractional actors: enough for 2 learner ranks + generator + scorer on 2 cores


def ensure_local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=LOCAL_RAY_CPUS,  # ours, not another `ray start` cluster's
                 include_dashboard=False, log_to_driver=True,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return ray


@pytest.fixture
def ray_local():
    """A local Ray shared by every test that asks for it."""
    return ensure_local_ray()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from srpo_ray.models import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory) -> str:
    from scripted_model import build_scripted_model
    return build_scripted_model(str(tmp_path_factory.mktemp("scripted_model")))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
