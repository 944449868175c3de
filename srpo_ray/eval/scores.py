"""Evaluation scores of one problem's k samples, and their averages over a benchmark.

- avg@k: the share of the k samples that are correct, i.e. pass@1 estimated from k
  samples (what SRPO and DeepSeek-R1 report as "pass@1, averaged over k samples").
- pass@K (K <= k): the chance that at least one of K samples drawn without replacement
  from the k is correct, the unbiased estimator of Chen et al. 2021 (HumanEval):
  1 - C(k - c, K) / C(k, K) for c correct samples.
- maj@k (math): majority vote over the samples' final answers. Two answers vote
  together when they are the same answer: every correct answer is equivalent to the
  truth by the checker, so all correct samples form one class; a wrong answer's class
  is its canonical form (the value of a plain number, else the text without
  whitespace). Samples without an answer do not vote. A tie between the top classes
  scores the expected accuracy of breaking it uniformly at random (1/m when the
  correct class is one of m tied classes), so the score is deterministic and unbiased.
All pure Python: no Ray, no torch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import comb
from typing import Hashable, Optional, Sequence

from srpo_ray.rewards.answer_forms import plain_number

CORRECT_CLASS = ("correct",)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def answer_class(answer: Optional[str], correct: bool) -> Optional[Hashable]:
    """The vote an answer casts in maj@k (see the module docstring); None: no vote."""
    if correct:
        return CORRECT_CLASS
    if answer is None or not answer.strip():
        return None
    value = plain_number(answer)
    return ("number", value) if value is not None else ("text", "".join(answer.split()))


def majority_correct(votes: Sequence[Optional[Hashable]]) -> float:
    """maj@k of one problem from its samples' answer classes (None = no vote)."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [cls for cls, count in counts.items() if count == top]
    return 1.0 / len(tied) if CORRECT_CLASS in tied else 0.0


@dataclass
class ProblemResult:
    """One problem's evaluation: its k samples' verdicts, answers and lengths, and the
    greedy sample's verdict (None when no greedy pass ran)."""

    prompt_id: str
    source: str
    domain: str
    correct: list[bool]
    answers: list[Optional[str]]
    lengths: list[int]
    truncated: list[bool]
    greedy_correct: Optional[bool] = None
    texts: list[str] = field(default_factory=list)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    def avg(self) -> float:
        return self.num_correct / len(self.correct)

    def pass_at(self, k: int) -> float:
        return pass_at_k(len(self.correct), self.num_correct, k)

    def majority(self) -> float:
        return majority_correct([answer_class(a, c) for a, c in zip(self.answers, self.correct)])


def aggregate(problems: Sequence[ProblemResult], k: int, pass_at: Sequence[int]) -> dict[str, float]:
    """Benchmark scores (each the mean over problems): avg@k, pass@K for every K in
    pass_at, maj@k (when every problem is math), greedy (when a greedy pass ran), mean
    response length, truncated and answered shares, and the problem count."""
    if not problems:
        return {}
    count = len(problems)
    out = {f"avg@{k}": sum(p.avg() for p in problems) / count}
    for K in pass_at:
        out[f"pass@{K}"] = sum(p.pass_at(K) for p in problems) / count
    if all(p.domain == "math" for p in problems):
        out[f"maj@{k}"] = sum(p.majority() for p in problems) / count
    greedy = [p.greedy_correct for p in problems if p.greedy_correct is not None]
    if greedy:
        out["greedy"] = sum(greedy) / len(greedy)
    samples = [(n, t, a) for p in problems for n, t, a in zip(p.lengths, p.truncated, p.answers)]
    out["response_len"] = sum(s[0] for s in samples) / len(samples)
    out["truncated_frac"] = sum(s[1] for s in samples) / len(samples)
    out["answered_frac"] = sum(s[2] is not None for s in samples) / len(samples)
    out["problems"] = float(count)
    return out
