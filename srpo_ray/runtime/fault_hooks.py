"""A seam for fault tests, and nothing else: the actor classes the runtime creates its
generation, reward and learner actors from pass through `actor_class`, which hands back the
class unchanged unless a test registered a wrapper for that name in ACTOR_CLASS_WRAPPERS
(tests/helpers_run.py's hook_actor_class: record where actors ran, or kill one mid-call).
Production code never registers one."""
from __future__ import annotations

from typing import Any, Callable

ACTOR_CLASS_WRAPPERS: dict[str, Callable[[Any], Any]] = {}
"""Actor class name ("GenerationWorker", "RewardWorker", "LearnerRank") -> wrapper(real class)."""


def actor_class(name: str, cls: Any) -> Any:
    """`cls`, or what a fault test's wrapper for `name` makes of it."""
    wrapper = ACTOR_CLASS_WRAPPERS.get(name)
    return cls if wrapper is None else wrapper(cls)
