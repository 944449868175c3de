"""The local Ray the Ray-tier tests share (tests/ray, tests/gpu, tests/helpers_run.py):
started once, by the first test that needs it, and shut down at the session's end
(tests/conftest.py) or by a test that needed a multi-node cluster of its own."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCAL_RAY_CPUS = 4  # fractional actors: enough for 2 learner ranks + generator + scorer on 2 cores


def ensure_local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=LOCAL_RAY_CPUS,  # ours, not another `ray start` cluster's
                 include_dashboard=False, log_to_driver=True,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return ray
