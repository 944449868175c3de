"""Ray glue: turn a PlacementPlan (cluster/placement.py) into placement groups and give
the `.options(...)` each actor is created with.

    placement = create_placement_groups(plan_placement(cfg), timeout_s=cfg.cluster.placement_timeout_s)
    learner = LearnerActor.options(**placement.actor_options("learner", rank)).remote(...)
    ...
    placement.remove()
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import PlacementError, PlacementPlan, check_fits


class PlacementTimeoutError(RuntimeError):
    """Placement groups were not ready in time; the message says which role lacks what."""


@dataclass
class RolePlacement:
    """Ready placement groups for a plan, keyed by group name."""
    plan: PlacementPlan
    groups: dict[str, PlacementGroup]

    def actor_options(self, role: str, index: int) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)` that put actor `index` of `role`
        into its bundle (num_cpus, num_gpus, resources, scheduling_strategy)."""
        slot = self.plan.slot(role, index)
        options: dict[str, Any] = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus,
                                   "resources": dict(slot.resources)}
        if slot.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.groups[slot.group], placement_group_bundle_index=slot.bundle_index)
        return options

    def num_actors(self, role: str) -> int:
        return len(self.plan.slots[role])

    def remove(self) -> None:
        """Release the reserved resources (actors inside the groups are killed by Ray)."""
        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}


def create_placement_groups(plan: PlacementPlan, timeout_s: float = 300.0) -> RolePlacement:
    """Create every group of `plan` and wait until all are placed. After `timeout_s`
    the groups are removed and PlacementTimeoutError names the pending roles, their
    bundles, and whether the cluster could ever hold them (see `check_fits`)."""
    # A run-unique suffix: group names show in `ray status`/the dashboard, and two
    # jobs on one cluster must not collide.
    suffix = uuid.uuid4().hex[:6]
    placement = RolePlacement(plan, {})
    try:
        for g in plan.groups:
            placement.groups[g.name] = placement_group([dict(b) for b in g.bundles], strategy=g.strategy,
                                                       name=f"{g.name}-{suffix}")
    except BaseException:
        placement.remove()  # don't leak the groups created before the failing one
        raise
    groups = dict(placement.groups)
    deadline = time.monotonic() + timeout_s
    pending = dict(groups)
    for name, pg in groups.items():
        if pg.wait(timeout_seconds=max(0.0, deadline - time.monotonic())):
            del pending[name]
    if pending:
        message = _explain_pending(plan, sorted(pending), timeout_s)
        placement.remove()
        raise PlacementTimeoutError(message)
    return placement


def _explain_pending(plan: PlacementPlan, pending: list[str], timeout_s: float) -> str:
    lines = [f"placement groups not ready after {timeout_s:g} s (cluster.placement_timeout_s):"]
    for name in pending:
        g = plan.group(name)
        lines.append(f"  {name} for {'+'.join(g.roles)} ({g.strategy}): bundles {list(g.bundles)}")
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    try:
        check_fits(plan, alive)
    except PlacementError as e:
        lines.append("The cluster's current nodes cannot hold the plan even when idle (an "
                     f"autoscaler may still add nodes; otherwise change the config): {e}")
    else:
        lines.append(f"The plan fits the cluster's {len(alive)} node(s) when they are idle, so other "
                     f"work holds the resources (free now: {_summary(ray.available_resources()) or 'nothing'}), or an "
                     f"autoscaler is still adding nodes: wait, free resources, or raise "
                     f"cluster.placement_timeout_s.")
    return "\n".join(lines)


def _summary(resources: dict[str, float]) -> dict[str, float]:
    # Drop Ray's bookkeeping entries (per-node ids, memory, per-group shares).
    return {k: v for k, v in resources.items() if not k.startswith("node:") and "_group_" not in k
            and k not in ("memory", "object_store_memory")}
