"""Typed records that travel between roles (driver, generation, reward, learner).

They are plain dataclasses so Ray pickles them by value; nothing here imports Ray or vLLM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DOMAINS = ("math", "code")  # the built-in rewards; rows scored by a reward plug-in may have any domain
_DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,63}")


def domain_problem(name: str) -> str | None:
    """Why `name` cannot be a domain (it becomes part of metric names such as
    reward/<domain>/mean), or None: lowercase letters, digits and _ . + -, at most 64,
    and not `all` (the name of the all-domains metrics)."""
    if name == "all":
        return "`all` is reserved (the metrics over all domains)"
    if not _DOMAIN_NAME.fullmatch(name):
        return "use lowercase letters, digits and _ . + - (at most 64)"
    return None


@dataclass(frozen=True)
class CodeCase:
    """One test case. stdin: `input` is fed on stdin, `output` is the expected stdout.
    functional: `input` is the JSON-encoded argument list (one JSON value per line, as
    LiveCodeBench writes it), `output` the JSON-encoded expected return value.
    assert: the tests are code (CodeSpec.test_code); the program runs once on an empty
    stdin, `input` and `output` are empty, and stdout is not compared."""

    input: str
    output: str
    testtype: str  # "stdin" | "functional" | "assert"


@dataclass(frozen=True)
class CodeSpec:
    """Ground truth of a code prompt: its test cases and, for functional cases, the
    name of the function (or `Solution` method) to call. The program that runs is
    `setup_code`, the response's code, then `test_code` (HumanEval-style tests: the
    prompt's imports and helpers before, asserts after), each part only if not empty."""

    cases: tuple[CodeCase, ...]
    fn_name: str | None = None
    setup_code: str = ""
    test_code: str = ""


@dataclass
class Prompt:
    """A training prompt. `prompt_id` is stable across runs (from the data file or a
    content hash) and keys the ledger."""

    prompt_id: str
    domain: str  # math, code, or (rows a reward plug-in scores) the row's ability
    messages: list[dict[str, str]]  # chat messages: [{"role": ..., "content": ...}]
    ground_truth: Any  # math: the answer as text; code: its CodeSpec; plug-in rows: the data's value as is
    data_source: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One rollout: the response tokens, the sampler's log-probability of each, and the
    decoded text. `finish_reason` is "stop" or "length" (truncated)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


@dataclass
class RolloutGroup:
    """The n samples drawn for one prompt by one policy version."""

    prompt: Prompt
    prompt_token_ids: list[int]
    samples: list[Sample]
    policy_version: int


@dataclass
class RewardResult:
    """Score of one sample. `correct` is the verifier's verdict (what the ledger
    records); `reward` may add shaping such as a format bonus. `info` carries flags
    such as {"timeout": True} for metrics."""

    reward: float
    correct: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredGroup:
    """A rollout group with one RewardResult per sample."""

    group: RolloutGroup
    results: list[RewardResult]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]

    @property
    def num_correct(self) -> int:
        return sum(r.correct for r in self.results)
