"""Typed records that travel between roles (driver, generation, reward, learner).

They are plain dataclasses so Ray pickles them by value; nothing here imports Ray or vLLM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

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


ABORTED = "abort"  # a sample paused by a weight update (partial rollouts), to be resumed
VersionRuns = tuple[tuple[int, int], ...]


def continuation_seed(sample_seed: int, kept_tokens: int) -> int:
    """The seed that resumes a paused sample after `kept_tokens` tokens: its own seed
    moved by the kept length, so the continuation does not replay the random draws of
    the sample's first tokens."""
    return (sample_seed * 1_000_003 + kept_tokens) % (1 << 62)


def token_versions(runs: VersionRuns, num_tokens: int, policy_version: int) -> np.ndarray:
    """The policy version that sampled each of a sample's tokens (int64 [num_tokens]):
    `runs` are (first token, version) pairs in order; none: all from `policy_version`."""
    out = np.full(num_tokens, policy_version, dtype=np.int64)
    for start, version in runs:
        out[start:] = version
    return out


@dataclass
class Sample:
    """One rollout as an engine returns it: the response tokens (int32), the sampler's
    log-probability of each (float32; empty when not asked for), the decoded text, and
    `finish_reason` "stop" or "length" (truncated), or ABORTED while paused. Lists are
    accepted and stored as numpy arrays: a token costs 4 + 4 bytes, not two Python
    objects. version_runs: (first token, policy version) from where a resumed sample's
    tokens came from other weights than its group's policy_version (empty: none)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finish_reason: str
    version_runs: VersionRuns = ()

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class SampleSummary:
    """What the driver knows of one sample without its tokens (lengths, truncation)."""

    num_tokens: int
    finish_reason: str
    version_runs: VersionRuns = ()


@dataclass
class GroupTokens:
    """The tokens of one rollout group, as compact arrays: the prompt's token ids, the
    responses' token ids and sampler log-probs concatenated (sample i is
    `offsets[i]:offsets[i+1]`). In a Ray run they stay in the object store: learner ranks
    fetch them by reference, the driver never does (only for the few groups written to
    rollouts.jsonl)."""

    prompt_token_ids: np.ndarray  # int32 [P]
    token_ids: np.ndarray  # int32 [sum of response lengths]
    logprobs: np.ndarray  # float32, as token_ids, or empty (not asked for)
    offsets: np.ndarray  # int64 [n + 1]

    @classmethod
    def of(cls, prompt_token_ids: Any, samples: list[Sample]) -> "GroupTokens":
        lengths = [len(s.token_ids) for s in samples]
        with_logprobs = any(len(s.logprobs) for s in samples)
        for i, s in enumerate(samples):
            if with_logprobs and len(s.logprobs) != len(s.token_ids):
                raise ValueError(f"sample {i} has {len(s.token_ids)} tokens but {len(s.logprobs)} log-probs; "
                                 "request one log-prob per sampled token from the generator")
        empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return cls(prompt_token_ids=np.asarray(prompt_token_ids, dtype=np.int32).reshape(-1),
                   token_ids=np.concatenate([s.token_ids for s in samples]) if samples else empty_i,
                   logprobs=np.concatenate([s.logprobs for s in samples]) if with_logprobs else empty_f,
                   offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def response(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's token ids and log-probs (empty log-probs when none were asked for)."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.token_ids[lo:hi], self.logprobs[lo:hi] if len(self.logprobs) else self.logprobs

    @property
    def nbytes(self) -> int:
        return int(self.prompt_token_ids.nbytes + self.token_ids.nbytes + self.logprobs.nbytes + self.offsets.nbytes)


@dataclass
class RolloutGroup:
    """The n samples drawn for one prompt by one policy version: what the driver reads
    (summaries, prompt length), and the tokens and texts, each here (GroupTokens, a
    tuple of str) or by reference (Ray object refs in a Ray run: learner ranks fetch
    the tokens, reward workers the texts; `here` refuses references)."""

    prompt: Prompt
    prompt_len: int
    samples: list[SampleSummary]
    policy_version: int
    tokens: Any  # GroupTokens, or a reference to one
    texts: Any  # tuple[str, ...], or a reference to one

    @classmethod
    def of(cls, prompt: Prompt, prompt_token_ids: Any, samples: list[Sample], policy_version: int) -> "RolloutGroup":
        """A group with its tokens and texts here, from an engine's samples."""
        return cls(prompt, len(prompt_token_ids),
                   [SampleSummary(len(s.token_ids), s.finish_reason, s.version_runs) for s in samples],
                   policy_version, GroupTokens.of(prompt_token_ids, samples), tuple(s.text for s in samples))

    @property
    def paused(self) -> bool:
        """Whether some sample waits to be resumed (partial rollouts)."""
        return any(s.finish_reason == ABORTED for s in self.samples)

    def by_reference(self, tokens: Any, texts: Any) -> "RolloutGroup":
        """This group's summary, with its tokens and texts replaced by references."""
        return replace(self, tokens=tokens, texts=texts)


def here(groups: list[RolloutGroup]) -> list[RolloutGroup]:
    """The groups, checked to hold their tokens and texts here (tests, one-process
    runs); references are the rollout fleet's to fetch (RayRolloutFleet.fetch)."""
    for g in groups:
        if not isinstance(g.tokens, GroupTokens) or not isinstance(g.texts, tuple):
            raise TypeError(f"the tokens or texts of group {g.prompt.prompt_id!r} are references "
                            f"({type(g.tokens).__name__}, {type(g.texts).__name__}): fetch them through the "
                            "rollout fleet")
    return list(groups)


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
        """The request for a group whose texts are here."""
        return cls.key_of(group).with_texts(here([group])[0].texts)

    @classmethod
    def key_of(cls, group: "RolloutGroup") -> "ScoreRequest":
        """The answer key without texts: a reward worker fills them in, fetched by
        reference from the object store (with_texts)."""
        p = group.prompt
        return cls(p.prompt_id, p.domain, p.data_source, p.ground_truth, p.extra_info, ())

    def with_texts(self, texts: tuple[str, ...]) -> "ScoreRequest":
        return replace(self, texts=tuple(texts))


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
