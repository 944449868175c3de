"""The Ray tier: tests that start a local Ray (tests/local_ray.py) or a real vLLM engine on
CPU, or run the driver / eval command end to end. Fixtures for every tier: tests/conftest.py."""
from __future__ import annotations

import pytest
from local_ray import ensure_local_ray


@pytest.fixture
def ray_local():
    """A local Ray shared by every test that asks for it."""
    return ensure_local_ray()
