"""Typed records that travel between roles (driver, generation, reward, learner).

They are plain dataclasses so Ray pickles them by value; nothing here imports Ray or vLLM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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


# ---- sampling ---------------------------------------------------------------------------
# The one rule of rollout seeds (rollout_seed): a generate call's seed is
# (base + index + round * ROUND_SEED_STRIDE) * PROMPT_SEED_SPAN, prompt k of the call samples
# from that + k*n (Sampling.for_prompt), and vLLM draws the n samples of one prompt from its
# own seed. Distinct within a call, across steps and rounds, whichever worker serves a chunk.
ROUND_SEED_STRIDE = 1_000_003  # a dynamic-sampling round's calls: a prompt drawn twice in a step gets fresh samples
PROMPT_SEED_SPAN = 1_000_000  # room for the prompt seeds of one call


def rollout_seed(base: int, index: int, round_index: int = 0) -> int:
    """The seed of prompt 0 of one generate call. base: rollout.seed (training) or
    eval.seed (evaluation); index: the training step, or the evaluation batch; round_index:
    the step's dynamic-sampling round (0 for the first, and for evaluation)."""
    return (base + index + round_index * ROUND_SEED_STRIDE) * PROMPT_SEED_SPAN


@dataclass(frozen=True)
class Sampling:
    """How to sample one generate call: n responses per prompt of at most
    `max_new_tokens`, at `temperature` (0: greedy) within the top-p nucleus. seed: prompt
    0's seed (rollout_seed), prompt k's is seed + k*n; None: the engine's own seeded
    stream. logprobs=False leaves Sample.logprobs empty (evaluation: nobody reads them).
    Not vLLM's SamplingParams: the engine turns this into those."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None
    logprobs: bool = True

    def with_seed(self, seed: int | None) -> "Sampling":
        return replace(self, seed=seed)

    def for_prompt(self, k: int) -> "Sampling":
        """The settings of the call's prompts from k on (a chunk starting at prompt k, or
        prompt k itself): the seed moves k prompts on, seed + k*n."""
        return self if self.seed is None or k == 0 else replace(self, seed=self.seed + k * self.n)


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


@dataclass(frozen=True)
class ScoreRequest:
    """What a reward worker needs to score one group: the prompt's identity and answer
    key (domain, data source, ground truth: the answer text, a CodeSpec or a plug-in's
    value; extra_info: code tests' function name, a plug-in's argument) and the response
    texts. No token ids or log-probs: the scorer reads none, and truncation is the
    driver's business (algo/overlong.py). Field names match Prompt's, so the scorer reads
    either."""

    prompt_id: str
    domain: str
    data_source: str
    ground_truth: Any
    extra_info: dict[str, Any]
    texts: tuple[str, ...]

    @classmethod
    def of(cls, group: "RolloutGroup") -> "ScoreRequest":
        p = group.prompt
        return cls(p.prompt_id, p.domain, p.data_source, p.ground_truth, p.extra_info,
                   tuple(s.text for s in group.samples))


def join_scores(groups: list["RolloutGroup"], results: list[list["RewardResult"]]) -> list["ScoredGroup"]:
    """The reward workers' results (one list per ScoreRequest.of(group), in order) joined
    back to the groups they score."""
    if len(results) != len(groups) or any(len(r) != len(g.samples) for g, r in zip(groups, results)):
        raise RuntimeError(f"reward workers returned {[len(r) for r in results]} results for groups of "
                           f"{[len(g.samples) for g in groups]} samples")
    return [ScoredGroup(group=g, results=r) for g, r in zip(groups, results)]


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
