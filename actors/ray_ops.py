"""The Ray operations the weight transports use (srpo_ray/weights/transport.py
ClusterOps), so that package never imports Ray."""
from __future__ import annotations

from typing import Any

import ray

# Ray starts worker processes at niceness 15 (its RAY_worker_niceness), so any driver,
# raylet or GCS wake-up preempts them at once. The generation workers and learner ranks
# are where a step's time goes: at 0, evaluation ran 1.08x faster here
# (bench/bench_eval.py, 2026-12-02). Reward workers stay at Ray's default.
HOT_PATH_NICENESS = {"RAY_worker_niceness": "0"}


class RayOps:
    def put(self, value: Any) -> Any:
        return ray.put(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        return ray.get(refs, timeout=timeout)

    def wait(self, refs: list[Any], num_returns: int, timeout: float | None, fetch_local: bool = True) -> tuple:
        return ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def current_actor(self) -> Any:
        return ray.get_runtime_context().current_actor

    def kill(self, handle: Any) -> None:
        ray.kill(handle, no_restart=True)
