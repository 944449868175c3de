"""Evaluate a policy on held-out problems with the roles training uses.

`Evaluator` takes the same rollout fleet (vLLM generation workers) and reward fleet
(math checker, code sandbox) as the trainer and knows nothing of Ray: it sends the
problems in batches of `eval.batch_prompts`, k samples each at the eval temperature
(plus one greedy decode when `eval.greedy`), scores each batch while the next one
generates, and turns the verdicts into scores per data source (srpo_ray/eval/scores.py).
It never touches training state: no ledger, no stage schedule, no data cursor, and
its sampling seeds are its own (`eval.seed`, the same at every evaluation of a run, so
two evaluations differ by the weights, not by the dice).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Protocol

from srpo_ray.config.schema import EvalConfig
from srpo_ray.eval.scores import ProblemResult, aggregate
from srpo_ray.records import Prompt, RolloutGroup, Sampling, ScoredGroup, here, rollout_seed
from srpo_ray.telemetry.metrics import timed

ALL = "all"


class Generator(Protocol):
    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[RolloutGroup]: ...


class Scorer(Protocol):
    def score(self, groups: list[RolloutGroup]) -> list[ScoredGroup]: ...


@dataclass
class EvalReport:
    """One evaluation: scores per data source (and `all` sources pooled), every
    problem's results, and what produced them."""

    k: int
    pass_at: list[int]
    temperature: float
    scores: dict[str, dict[str, float]]
    problems: list[ProblemResult]
    policy_version: int
    seconds: float
    step: Optional[int] = None
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat `eval/<source>/<score>` metrics for metrics.jsonl, plus eval time and throughput."""
        out = {f"eval/{source}/{name}": value for source, scores in self.scores.items()
               for name, value in scores.items()}
        out["time/eval"] = self.seconds
        out.update({f"time/eval_{name.removesuffix('_seconds')}": value for name, value in self.extra.items()
                    if name.endswith("_seconds")})
        out["eval/samples_per_s"] = self.samples / self.seconds if self.seconds > 0 else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "policy_version": self.policy_version, "k": self.k, "pass_at": self.pass_at,
                "temperature": self.temperature, "seconds": self.seconds, "samples": self.samples,
                "scores": self.scores, **self.extra, "problems": [asdict(p) for p in self.problems]}


class Evaluator:
    def __init__(self, cfg: EvalConfig, prompts: list[Prompt], rollout: Generator, rewards: Scorer,
                 max_new_tokens: int,
                 fetch_texts: Callable[[list[RolloutGroup]], list[RolloutGroup]] = here):
        """prompts: every eval problem (eval.max_problems_per_source applied here);
        max_new_tokens: the response cap when eval.max_new_tokens is 0; fetch_texts:
        returns the groups with their texts here (the report keeps them; the rollout
        fleet's fetch without tokens when they stay in Ray's object store)."""
        self.cfg, self.rollout, self.rewards, self.fetch_texts = cfg, rollout, rewards, fetch_texts
        self.prompts = first_per_source(prompts, cfg.max_problems_per_source)
        self.max_new_tokens = cfg.max_new_tokens or max_new_tokens
        # temperature 0 draws the same sample k times: one greedy decode says it all
        self.k = cfg.k if cfg.temperature > 0 else 1
        self.pass_at = sorted(set(cfg.pass_at or [1, self.k]))

    def run(self, progress: Optional[Callable[[int, int], None]] = None) -> EvalReport:
        """Evaluate the weights the generators hold now. progress(done, total) is called
        after each batch is scored."""
        started = time.perf_counter()
        # logprobs off: scores read tokens and text only, and log-probs cost 12-15% of generation
        sampling = Sampling(n=self.k, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                            max_new_tokens=self.max_new_tokens, logprobs=False)
        greedy = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens, logprobs=False)
        batches = [self.prompts[i:i + self.cfg.batch_prompts]
                   for i in range(0, len(self.prompts), self.cfg.batch_prompts)]
        problems: list[ProblemResult] = []
        versions: set[int] = set()
        # where the time goes: generating, and waiting for scores the generation did not hide
        timing = {"generate_seconds": 0.0, "score_wait_seconds": 0.0}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-score") as scoring:
            pending: Optional[Future] = None
            for index, batch in enumerate(batches):
                seed = rollout_seed(self.cfg.seed, index)  # batch `index`'s, the same at every evaluation
                with timed(timing, "generate_seconds"):
                    groups = self.rollout.generate(batch, sampling.with_seed(seed))
                    greedy_groups = self.rollout.generate(batch, greedy.with_seed(seed)) \
                        if self.cfg.greedy and self.k > 1 else []
                versions.update(g.policy_version for g in groups + greedy_groups)
                if pending is not None:
                    with timed(timing, "score_wait_seconds"):
                        problems += pending.result()
                    if progress:
                        progress(len(problems), len(self.prompts))
                pending = scoring.submit(self._score, batch, groups, greedy_groups)
            if pending is not None:
                with timed(timing, "score_wait_seconds"):
                    problems += pending.result()
                if progress:
                    progress(len(problems), len(self.prompts))
        if len(versions) > 1:
            raise RuntimeError(f"evaluation sampled from several policy versions {sorted(versions)}: "
                               "the weights changed while it ran")
        return EvalReport(k=self.k, pass_at=self.pass_at, temperature=self.cfg.temperature,
                          scores=scores_by_source(problems, self.k, self.pass_at), problems=problems,
                          policy_version=versions.pop() if versions else -1,
                          seconds=time.perf_counter() - started,
                          samples=len(problems) * (self.k + (1 if self.cfg.greedy and self.k > 1 else 0)),
                          extra={name: round(value, 3) for name, value in timing.items()})

    def _score(self, batch: list[Prompt], groups: list[RolloutGroup],
               greedy_groups: list[RolloutGroup]) -> list[ProblemResult]:
        scored = self.rewards.score(groups + greedy_groups)
        sampled, greedy = scored[:len(groups)], scored[len(groups):]
        texts = [g.texts for g in self.fetch_texts([sg.group for sg in sampled])]  # the report keeps them
        results = []
        for i, (prompt, sg) in enumerate(zip(batch, sampled)):
            if sg.group.prompt.prompt_id != prompt.prompt_id:
                raise RuntimeError(f"scored groups came back out of order ({sg.group.prompt.prompt_id} "
                                   f"where {prompt.prompt_id} was expected)")
            custom = any(r.info.get("custom") for r in sg.results)  # a plug-in gives no answer to vote on
            results.append(ProblemResult(
                prompt_id=prompt.prompt_id, source=prompt.data_source or prompt.domain,
                domain="custom" if custom else prompt.domain,
                correct=[r.correct for r in sg.results],
                answers=[_answer(prompt.domain, r.info) for r in sg.results],
                lengths=[s.num_tokens for s in sg.group.samples],
                truncated=[s.finish_reason == "length" for s in sg.group.samples],
                greedy_correct=greedy[i].results[0].correct if greedy else None,
                texts=list(texts[i])))
        return results


def first_per_source(prompts: list[Prompt], limit: int) -> list[Prompt]:
    """The first `limit` prompts of each data source, in order (all when limit is 0)."""
    if not limit:
        return list(prompts)
    seen: dict[str, int] = {}
    kept = []
    for p in prompts:
        seen[p.data_source] = seen.get(p.data_source, 0) + 1
        if seen[p.data_source] <= limit:
            kept.append(p)
    return kept


def scores_by_source(problems: list[ProblemResult], k: int, pass_at: list[int]) -> dict[str, dict[str, float]]:
    sources = sorted({p.source for p in problems})
    out = {s: aggregate([p for p in problems if p.source == s], k, pass_at) for s in sources}
    if len(sources) > 1:
        out[ALL] = aggregate(problems, k, pass_at)
    return out


def _answer(domain: str, info: dict) -> Optional[str]:
    """The final answer a sample gave (math), or a marker that it gave a program (code)
    or, for a reward plug-in's row, that it answered (the plug-in's `answered`, else the
    format rule: srpo_ray/rewards/plugins.py)."""
    if info.get("custom"):
        return "<answered>" if info.get("answered") else None
    if domain == "math":
        answer = str(info.get("answer") or "").strip()
        return answer or None  # an empty \boxed{} (the instruction copied) is no answer
    return None if info.get("error") == "no code block" else "<program>"
