"""The GPU tier (check_device.sh runs it on a GPU machine): every test here is `gpu`-marked
and skipped where CUDA is missing, whatever its own marks say."""
from __future__ import annotations

from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.path.is_relative_to(GPU_DIR)]
    if not gpu_items:
        return
    import torch

    for item in gpu_items:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
