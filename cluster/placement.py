"""Where each role runs, as a pure function of the config (no Ray import).

`plan_placement(cfg)` turns the role sizes (learner ranks, generation workers,
reward workers) into placement groups of resource bundles plus one slot per actor
(which group, which bundle, what the actor itself requests). `check_fits(plan,
nodes)` simulates placing that plan on a described cluster, so a plan that cannot
run is rejected with a message naming the role and the fix, before (or instead of)
waiting on Ray. `cluster/ray_placement.py` turns a plan into real placement groups.

Resource dicts use Ray's names: "CPU", "GPU", and custom resources such as the
node-pool labels ("srpo_learner": nodes advertise it with `ray start --resources`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from srpo_ray.config.schema import ConfigError, SRPOConfig

LEARNER, ROLLOUT, REWARD = "learner", "rollout", "reward"
ROLES = (LEARNER, ROLLOUT, REWARD)
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
NO_GROUP = "none"
LABEL_SHARE = 0.001
"""How much of a node-pool label each bundle asks for: a marker, not a limit, so a node
advertising `{"srpo_learner": 1}` can hold up to 1000 bundles of that pool."""
_UNIT = 10_000  # Ray's own resource granularity is 1e-4; integers avoid float drift.

# For error messages: the config keys that size each role (count, cpus, gpus).
_ROLE_KEYS = {
    LEARNER: ("learner.num_ranks", "learner.cpus_per_rank", "learner.gpus_per_rank"),
    ROLLOUT: ("rollout.num_workers", "rollout.cpus_per_worker", "rollout.gpus_per_worker"),
    REWARD: ("reward.num_workers", "reward.cpus_per_worker", None),
}


class PlacementError(ValueError):
    """A plan does not fit a cluster; the message names the role and what to change."""


@dataclass(frozen=True)
class BundleGroup:
    """One Ray placement group: `bundles[i]` is a resource dict, e.g. {"CPU": 1, "GPU": 1}."""
    name: str
    strategy: str
    bundles: tuple[dict[str, float], ...]
    roles: tuple[str, ...]


@dataclass(frozen=True)
class ActorSlot:
    """Where actor `index` of `role` goes and what it requests. `group` is None for an
    actor placed without a placement group; then `resources` carries its pool label."""
    role: str
    index: int
    group: Optional[str]
    bundle_index: Optional[int]
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementPlan:
    groups: tuple[BundleGroup, ...]
    slots: dict[str, tuple[ActorSlot, ...]]

    def group(self, name: str) -> BundleGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no placement group named {name!r}; have {[g.name for g in self.groups]}")

    def slot(self, role: str, index: int) -> ActorSlot:
        if role not in self.slots:
            raise KeyError(f"unknown role {role!r}; roles are {list(self.slots)}")
        if not 0 <= index < len(self.slots[role]):
            raise IndexError(f"{role} has {len(self.slots[role])} actors, no index {index}")
        return self.slots[role][index]

    def describe(self) -> str:
        """Human-readable summary for logs."""
        lines = [f"group {g.name} ({'+'.join(g.roles)}, {g.strategy}): "
                 + ", ".join(_fmt(b) for b in g.bundles) for g in self.groups]
        for role, slots in self.slots.items():
            free = [s for s in slots if s.group is None]
            if free:
                lines.append(f"{role}: {len(free)} actor(s) without a group, each "
                             f"{_fmt(_actor_request(free[0]))}")
        return "\n".join(lines)


def plan_placement(cfg: SRPOConfig, roles: tuple[str, ...] = ROLES) -> PlacementPlan:
    """Bundles, groups and per-actor slots for the configured roles (`roles`: only
    these, e.g. generation and reward workers for an evaluation).

    Learner ranks PACK into one group (FSDP collectives stay on few nodes). Generation
    workers get a group of their own, or with `cluster.colocate` share the learner's
    bundles. Reward workers get a SPREAD group (or none). Raises ConfigError naming the
    key when the sizes cannot be expressed as Ray bundles.
    """
    c, lr, ro, rw = cfg.cluster, cfg.learner, cfg.rollout, cfg.reward
    for key, value, allowed in (("cluster.learner_strategy", c.learner_strategy, STRATEGIES),
                                ("cluster.rollout_strategy", c.rollout_strategy, STRATEGIES),
                                ("cluster.reward_strategy", c.reward_strategy, STRATEGIES + (NO_GROUP,))):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    _check_actor_request(LEARNER, lr.cpus_per_rank, lr.gpus_per_rank)
    _check_actor_request(ROLLOUT, ro.cpus_per_worker, ro.gpus_per_worker)
    _check_actor_request(REWARD, rw.cpus_per_worker, 0.0)
    if ro.gpus_per_worker > 0 and ro.tensor_parallel_size > 1 \
            and ro.gpus_per_worker != ro.tensor_parallel_size:
        raise ConfigError(f"rollout.gpus_per_worker={ro.gpus_per_worker} with tensor_parallel_size="
                          f"{ro.tensor_parallel_size}: each tensor-parallel shard needs its own GPU; "
                          f"set rollout.gpus_per_worker={ro.tensor_parallel_size}")

    fractional_learner = lr.num_ranks > 1 and 0 < lr.gpus_per_rank < 1
    if fractional_learner and LEARNER in roles and not c.colocate:
        raise ConfigError(
            f"learner.gpus_per_rank={lr.gpus_per_rank:g} with learner.num_ranks={lr.num_ranks}: Ray may give two "
            "ranks shares of one GPU, and NCCL then fails (\"Duplicate GPU detected\"); give each rank a whole "
            "GPU (learner.gpus_per_rank=1), or set cluster.colocate=true so each rank's bundle (the rank plus "
            "its generators) adds up to one whole GPU")

    learner_one = _request(lr.cpus_per_rank, lr.gpus_per_rank)
    rollout_one = _request(ro.cpus_per_worker, ro.gpus_per_worker)
    reward_one = _request(rw.cpus_per_worker, 0.0)
    groups: list[BundleGroup] = []
    slots: dict[str, list[ActorSlot]] = {role: [] for role in ROLES}

    if LEARNER not in roles:  # no learner to share bundles with
        groups.append(_role_group(ROLLOUT, ro.num_workers, rollout_one, c.rollout_node_label,
                                  c.rollout_strategy, slots))
    elif c.colocate:
        if c.rollout_node_label not in (None, c.learner_node_label):
            raise ConfigError(f"cluster.rollout_node_label={c.rollout_node_label!r} has no effect with "
                              f"cluster.colocate=true (generators share the learner's bundles and pool); "
                              f"unset it, or set cluster.colocate=false")
        groups.append(_colocated_group(cfg, learner_one, rollout_one, slots))
    else:
        groups.append(_role_group(LEARNER, lr.num_ranks, learner_one, c.learner_node_label,
                                  c.learner_strategy, slots))
        groups.append(_role_group(ROLLOUT, ro.num_workers, rollout_one, c.rollout_node_label,
                                  c.rollout_strategy, slots))

    if REWARD not in roles:
        pass
    elif c.reward_strategy == NO_GROUP:
        label = {c.reward_node_label: LABEL_SHARE} if c.reward_node_label else {}
        slots[REWARD] = [ActorSlot(REWARD, i, None, None, reward_one.get("CPU", 0.0), 0.0, dict(label))
                         for i in range(rw.num_workers)]
    else:
        groups.append(_role_group(REWARD, rw.num_workers, reward_one, c.reward_node_label,
                                  c.reward_strategy, slots))
    for g in groups:
        for bundle in g.bundles:
            if not bundle:
                role = g.roles[0]
                _, cpus_key, _ = _ROLE_KEYS[role]
                raise ConfigError(f"{cpus_key}: the {role} asks for no CPU, GPU or node label, and a Ray "
                                  f"placement bundle must reserve something; set {cpus_key} > 0 "
                                  f"(0.01 is enough)")
    return PlacementPlan(tuple(groups), {role: tuple(s) for role, s in slots.items()})


def check_fits(plan: PlacementPlan, nodes: list[dict[str, float]]) -> None:
    """Raise PlacementError unless `plan` fits on `nodes` (each a dict of the node's total
    or free resources, as `ray.nodes()[i]["Resources"]`). Groups are placed in order,
    greedily (first fit, honouring each strategy), much as Ray's scheduler does."""
    free = [{k: _to_units(v) for k, v in node.items() if isinstance(v, (int, float))} for node in nodes]
    total = [dict(node) for node in free]
    for group in plan.groups:
        _place_group(group, free, total)
    for role, slots in plan.slots.items():
        loose = [_actor_request(s) for s in slots if s.group is None]
        if loose:
            pseudo = BundleGroup(f"{role} (no placement group)", "SPREAD", tuple(loose), (role,))
            _place_group(pseudo, free, total)


def local_num_cpus_needed(cfg: SRPOConfig, roles: tuple[str, ...] = ROLES) -> int:
    """CPUs a single-machine Ray needs to host `roles`: ceil of the summed (possibly
    fractional) CPU requests, at least 1."""
    plan = plan_placement(cfg, roles)
    units = sum(_to_units(b.get("CPU", 0.0)) for g in plan.groups for b in g.bundles)
    units += sum(_to_units(s.num_cpus) for slots in plan.slots.values() for s in slots if s.group is None)
    return max(1, math.ceil(units / _UNIT))


def local_custom_resources(cfg: SRPOConfig, roles: tuple[str, ...] = ROLES) -> dict[str, float]:
    """Custom resources (node-pool labels) a single-machine Ray must advertise so that a
    labelled plan still fits there: pass as `ray.init(resources=...)`."""
    plan = plan_placement(cfg, roles)
    needed: dict[str, int] = {}
    requests = [b for g in plan.groups for b in g.bundles]
    requests += [s.resources for slots in plan.slots.values() for s in slots if s.group is None]
    for req in requests:
        for name, amount in req.items():
            if name not in ("CPU", "GPU"):
                needed[name] = needed.get(name, 0) + _to_units(amount)
    return {name: float(math.ceil(units / _UNIT)) for name, units in needed.items()}


# ---- building the plan ----

def _check_actor_request(role: str, cpus: float, gpus: float) -> None:
    _, cpus_key, gpus_key = _ROLE_KEYS[role]
    if cpus < 0:
        raise ConfigError(f"{cpus_key}={cpus}: must be >= 0")
    if gpus < 0:
        raise ConfigError(f"{gpus_key}={gpus}: must be >= 0")
    if gpus > 1 and not float(gpus).is_integer():
        # Ray hands out whole GPUs, or a share of one GPU; 1.5 GPUs cannot be granted.
        raise ConfigError(f"{gpus_key}={gpus}: a GPU request above 1 must be a whole number "
                          f"(Ray shares a single GPU, not fractions of several)")


def _request(cpus: float, gpus: float) -> dict[str, float]:
    req = {"CPU": float(cpus), "GPU": float(gpus)}
    return {k: v for k, v in req.items() if v > 0}


def _add(*requests: dict[str, float]) -> dict[str, float]:
    units: dict[str, int] = {}
    for req in requests:
        for k, v in req.items():
            units[k] = units.get(k, 0) + _to_units(v)
    return {k: u / _UNIT for k, u in units.items()}


def _with_label(bundle: dict[str, float], label: Optional[str]) -> dict[str, float]:
    return {**bundle, label: LABEL_SHARE} if label else dict(bundle)


def _slot(role: str, index: int, group: str, bundle_index: int, req: dict[str, float]) -> ActorSlot:
    # The bundle already pins the node pool, so the actor requests only CPU/GPU from it.
    return ActorSlot(role, index, group, bundle_index, req.get("CPU", 0.0), req.get("GPU", 0.0), {})


def _role_group(role: str, count: int, one: dict[str, float], label: Optional[str], strategy: str,
                slots: dict[str, list[ActorSlot]]) -> BundleGroup:
    name = f"srpo-{role}"
    slots[role] = [_slot(role, i, name, i, one) for i in range(count)]
    return BundleGroup(name, strategy, tuple(_with_label(one, label) for _ in range(count)), (role,))


def _colocated_group(cfg: SRPOConfig, learner_one: dict[str, float], rollout_one: dict[str, float],
                     slots: dict[str, list[ActorSlot]]) -> BundleGroup:
    """Bundle i = learner rank i + generators j with j % num_ranks == i (they share its GPU)."""
    name, num_ranks = "srpo-colocated", cfg.learner.num_ranks
    bundles = []
    for i in range(num_ranks):
        gens = [j for j in range(cfg.rollout.num_workers) if j % num_ranks == i]
        bundle = _add(learner_one, *[rollout_one] * len(gens))
        gpu = bundle.get("GPU", 0.0)
        lone_share = num_ranks > 1 and 0 < cfg.learner.gpus_per_rank < 1
        if lone_share and gpu != 1.0:
            raise ConfigError(
                f"cluster.colocate: learner rank {i} shares its GPU with {len(gens)} generator(s), {gpu:g} GPU in "
                f"all; with {num_ranks} ranks each bundle must add up to exactly one GPU, so no two ranks can land "
                f"on one (NCCL: \"Duplicate GPU detected\"): make learner.gpus_per_rank + {len(gens)} x "
                "rollout.gpus_per_worker = 1")
        if gpu > 1 and not float(gpu).is_integer():
            raise ConfigError(
                f"cluster.colocate: learner rank {i} and its {len(gens)} generator(s) ask for {gpu:g} GPUs "
                f"in one bundle; GPU shares above 1 must be whole numbers: make learner.gpus_per_rank + "
                f"{len(gens)} x rollout.gpus_per_worker <= 1 (to share one GPU) or a whole number")
        bundles.append(_with_label(bundle, cfg.cluster.learner_node_label))
        slots[LEARNER].append(_slot(LEARNER, i, name, i, learner_one))
        slots[ROLLOUT].extend(_slot(ROLLOUT, j, name, i, rollout_one) for j in gens)
    slots[ROLLOUT].sort(key=lambda s: s.index)
    return BundleGroup(name, cfg.cluster.learner_strategy, tuple(bundles), (LEARNER, ROLLOUT))


def _actor_request(slot: ActorSlot) -> dict[str, float]:
    return {**_request(slot.num_cpus, slot.num_gpus), **slot.resources}


# ---- simulating placement ----

def _to_units(x: float) -> int:
    return round(float(x) * _UNIT)


def _fits(need: dict[str, int], have: dict[str, int]) -> bool:
    return all(have.get(k, 0) >= v for k, v in need.items())


def _take(need: dict[str, int], have: dict[str, int]) -> None:
    for k, v in need.items():
        have[k] = have.get(k, 0) - v


def _place_group(group: BundleGroup, free: list[dict[str, int]], total: list[dict[str, int]]) -> None:
    """Take `group`'s bundles out of `free` (per node, in resource units) or raise."""
    strategy = group.strategy
    needs = [{k: _to_units(v) for k, v in b.items()} for b in group.bundles]
    if strategy == "STRICT_PACK":
        whole = {k: sum(n.get(k, 0) for n in needs) for n in needs for k in n}
        for node in free:
            if _fits(whole, node):
                _take(whole, node)
                return
        raise PlacementError(_explain(group, None, whole, free, total))
    used: list[int] = []
    for b_index, need in enumerate(needs):
        unused = [i for i in range(len(free)) if i not in used]
        if strategy == "PACK":
            order = used + unused
        elif strategy == "SPREAD":
            order = unused + used
        else:  # STRICT_SPREAD
            order = unused
        chosen = next((i for i in order if _fits(need, free[i])), None)
        if chosen is None:
            raise PlacementError(_explain(group, b_index, need, free, total))
        _take(need, free[chosen])
        if chosen not in used:
            used.append(chosen)


def _explain(group: BundleGroup, b_index: Optional[int], need: dict[str, int],
             free: list[dict[str, int]], total: list[dict[str, int]]) -> str:
    roles = f"role {group.roles[0]}" if len(group.roles) == 1 else f"roles {'+'.join(group.roles)} (colocated)"
    what = (f"all {len(group.bundles)} bundles together ({_fmt_units(need)}) on one node"
            if b_index is None else f"bundle {b_index} of {len(group.bundles)} ({_fmt_units(need)})")
    head = (f"{roles} does not fit the cluster: placement group {group.name} ({group.strategy}) "
            f"needs {what}. ")
    nodes = "; ".join(f"node {i}: free {_fmt_units(f)} of {_fmt_units(t)}"
                      for i, (f, t) in enumerate(zip(free, total))) or "no nodes"
    return head + _fix(group, need, free, total) + f" Cluster: {nodes}."


def _fix(group: BundleGroup, need: dict[str, int], free: list[dict[str, int]],
         total: list[dict[str, int]]) -> str:
    role = group.roles[0]  # the colocated group uses the learner's label and strategy
    sizes = " / ".join(k for r in group.roles for k in _ROLE_KEYS[r] if k)
    for name in need:
        if name not in ("CPU", "GPU") and not any(t.get(name, 0) > 0 for t in total):
            return (f"No node advertises the label {name!r}: start the {role} nodes with "
                    f"`ray start --resources='{{\"{name}\": 1}}'` (cluster/start_worker.sh), "
                    f"or unset cluster.{role}_node_label.")
    if not any(_fits(need, t) for t in total):
        if group.strategy == "STRICT_PACK":
            return (f"No node is that large: set cluster.{role}_strategy=PACK, or lower {sizes}.")
        return f"No single node is that large: lower {sizes}, or use larger nodes."
    if group.strategy == "STRICT_SPREAD":
        return (f"STRICT_SPREAD needs {len(group.bundles)} distinct nodes with room: "
                f"set cluster.{role}_strategy=SPREAD, or add nodes.")
    # Only nodes of the right pool (carrying the bundle's labels) count as room.
    eligible = [f for f, t in zip(free, total) if all(t.get(k, 0) >= v for k, v in need.items()
                                                       if k not in ("CPU", "GPU"))]
    short = [k for k in need if sum(max(f.get(k, 0), 0) for f in eligible) < need[k]]
    short_txt = (f"There is too little free {', '.join(short)} on the nodes that may hold it" if short
                 else "The free resources are split across nodes so that no node has room")
    return (f"{short_txt} for all its bundles (roles placed earlier took their share): "
            f"add nodes, or lower {sizes} (or the other roles' sizes).")


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def _fmt_units(res: dict[str, int]) -> str:
    shown = {k: v / _UNIT for k, v in res.items()
             if k in ("CPU", "GPU") or (not k.startswith("node:") and k not in
                                       ("memory", "object_store_memory") and "_group_" not in k)}
    return _fmt(shown)
