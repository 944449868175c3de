"""Per-step metrics: one JSON line per step in `<run_dir>/metrics.jsonl`, the trackers of
metrics.trackers (TensorBoard, W&B, MLflow: srpo_ray/telemetry/trackers.py), and a progress bar on
stderr.

Metric names (also explained in README.md):
    reward/<domain>/mean, response_len/<domain>/mean   per domain, this step's rollouts
    correct/<domain>/mean         verifier-correct fraction per domain
    reward/source/<data_source>/mean, correct/source/<data_source>/mean   the same per
                                   data source (as verl reports them); a domain has no
                                   `/`, so these never clash with reward/<domain>/mean
    reward/custom_errors, reward/custom_timeouts   responses a reward plug-in failed to score
                                   (raised, crashed, ran out of memory, returned no number) /
                                   timed out on; each scored 0 (only in steps with plug-in rows)
    reward/custom/<name>/mean     mean of a number a plug-in returned in its dict next to
                                   `score`, over the responses it returned it for
    correct/math/not_number_frac  share of correct math answers that are not a plain number
                                   (expressions math-verify evaluated: a restated question
                                   such as \\boxed{29\\cdot 5} is a reward hack to look for)
    groups/zero_variance_frac     share of groups whose rewards are all equal (no gradient),
                                   over every group generated in the step
    collect/rounds, collect/prompts_drawn   rounds of generate + score in the step and
                                   prompts they drew (1 and prompts_per_step unless
                                   algo.dynamic_sampling draws more)
    collect/groups_kept            groups passed on to advantages and the batch
                                   (dynamic sampling: those with reward variance, at most
                                   prompts_per_step); collect/filled: 1 if that many were found
    learner/kl_ref                 mean k3 KL to the reference policy (algo.kl_coef > 0)
    pool/size, pool/removed        prompts eligible now / dropped by History Resampling
    policy/version                 weights version the learner holds after the step
    rollout/staleness_mean, _max   weight versions between the policy that sampled the step's
                                   rollouts and the learner that trained on them (0 on-policy,
                                   at most rollout.steps_ahead otherwise)
    rollout/token_staleness_mean   rollout.partial_rollouts: the same per token (a paused sample's
                                   tokens after a weight update are fresher than its start);
                                   rollout/resumed_frac the samples continued across an update,
                                   rollout/pauses, rollout/resumed_groups the fleet's pauses
    time/generate, time/score, time/train, time/weight_sync, time/step   seconds
    time/weight_publish, time/weight_load   parts of time/weight_sync: the learner publishing
                                   the weights, the slowest generation worker loading them
                                   (transport read + the engine's reload; the rest is RPCs;
                                   weight_load only where the worker reads the tensors itself:
                                   shared_memory, object_store, broadcast)
    time/wait_rollouts             the step waiting for its rollouts (with steps_ahead > 0:
                                   the generation time training did not hide)
    time/wait_collect_ahead        training done, waiting for a running collection to finish
                                   before the weight push (steps_ahead > 0; push time excluded)
    time/generator_idle            seconds no collection ran since the last step's metrics
                                   (the generators wait for the learner: pushes, admission)
    time/learner_wait              seconds the trainer waited for rollouts or for a collection
                                   to end before pushing (the learner waits for the generators)
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from srpo_ray.records import token_versions
from srpo_ray.rewards.answer_forms import plain_number
from srpo_ray.telemetry.trackers import generation_rows, numeric

if TYPE_CHECKING:
    from srpo_ray.records import RolloutGroup
    from srpo_ray.telemetry.trackers import Tracker

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("reward/mean", "groups/zero_variance_frac", "pool/size", "time/step")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0,
                 progress_bar: bool = True, trackers: Sequence[Tracker] = ()):
        """trackers: started trackers (srpo_ray.telemetry.trackers.make_trackers); closed by close()."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self.trackers = list(trackers)
        self._step = start_step  # the newest step logged: trackers see events at it
        self._bar = None
        self._postfix: dict[str, Any] = {}  # the latest step's figures on the progress bar
        self._eval_postfix: dict[str, Any] = {}  # and the latest evaluation's avg@k
        # the trainer collects rollouts ahead in a thread (rollout.steps_ahead)
        self._lock = threading.Lock()
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="srpo", file=sys.stderr,
                             dynamic_ncols=True)

    def start_at(self, step: int) -> None:
        """The run continues after `step` (--resume): the bar and the trackers' event step."""
        with self._lock:
            self._step = step
            if self._bar is not None:
                self._bar.n = step
                self._bar.refresh()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._log(step, metrics)

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._step = max(self._step, step)
        self._to_trackers("log", step, numeric(metrics))
        if self._bar is not None:
            self._bar.update(1)
            postfix = {k.split("/")[-2] if k.count("/") > 1 else k: _short(record[k])
                       for k in PROGRESS_KEYS if k in record}
            self._postfix = postfix
            self._bar.set_postfix({**postfix, **self._eval_postfix}, refresh=False)

    def log_eval(self, step: int, metrics: dict[str, Any], summary: str) -> None:
        """An evaluation's `eval/...` metrics at `step` (a line of its own in
        metrics.jsonl; the progress bar keeps its count and shows `summary`)."""
        with self._lock:
            record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
            self._file.write(json.dumps(record) + "\n")
            self._step = max(self._step, step)
            self._to_trackers("log", step, numeric(metrics))
            self._eval_postfix = _eval_headline(metrics)
            if self._bar is not None:
                self._bar.set_postfix({**self._postfix, **self._eval_postfix}, refresh=True)
            self._event(f"step {step}: eval {summary}")

    def rollouts(self, step: int, scored: list, learner_version: int) -> None:
        """Append scored groups, whose tokens and texts are here (records.here), to
        rollouts.jsonl, for reading what the policy writes (and for checking weight sync:
        each sample keeps its log-probs), and send their samples to the trackers'
        generations table. staleness: how many weight versions the learner that trains on
        the group is ahead of the policy that sampled it."""
        if not scored:
            return
        with self._lock, open(self.path.with_name("rollouts.jsonl"), "a") as f:
            for sg in scored:
                g, t = sg.group, sg.group.tokens
                responses = [t.response(i) for i in range(len(g.samples))]
                f.write(json.dumps({
                    "step": step, "prompt_id": g.prompt.prompt_id, "domain": g.prompt.domain,
                    "policy_version": g.policy_version, "staleness": learner_version - g.policy_version,
                    "prompt_token_ids": t.prompt_token_ids.tolist(),
                    "samples": [{"text": text, "token_ids": ids.tolist(), "logprobs": lps.tolist(),
                                 "finish_reason": s.finish_reason, "reward": r.reward, "correct": r.correct,
                                 # partial rollouts: (first token, version) where other weights took over
                                 **({"version_runs": [list(run) for run in s.version_runs]} if s.version_runs else {})}
                                for s, r, text, (ids, lps) in zip(g.samples, sg.results, g.texts, responses)],
                }) + "\n")
            if self.trackers:
                self._to_trackers("table", step, generation_rows(step, scored))

    def event(self, message: str) -> None:
        """A one-off line (stage switch, epoch end, resume) above the progress bar."""
        with self._lock:
            self._event(message)

    def _event(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
        self._to_trackers("event", self._step, message)

    def _to_trackers(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker's outage must not stop training
                self.trackers.remove(tracker)
                log.warning("tracker %s failed (%s: %s); it is off for the rest of the run (metrics.jsonl "
                            "still has everything)", type(tracker).__name__, type(e).__name__, e)

    def close(self, failed: bool = False) -> None:
        """failed: the run stopped on an error (trackers mark their run so)."""
        if self._bar is not None:
            self._bar.close()
        for tracker in self.trackers:
            try:
                tracker.close(failed=failed)
            except Exception as e:
                log.warning("tracker %s did not close cleanly: %s", type(tracker).__name__, e)
        self.trackers = []
        self._file.close()


def _eval_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"eval avg@k": value} of all sources pooled (or the only one) for the progress bar."""
    keys = sorted(k for k in metrics if k.startswith("eval/") and "/avg@" in k)
    pooled = [k for k in keys if k.startswith("eval/all/")] or keys[:1]
    return {f"eval {pooled[0].rsplit('/', 1)[1]}": _short(float(metrics[pooled[0]]))} if pooled else {}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def token_staleness(groups: list["RolloutGroup"], learner_version: int) -> dict[str, float]:
    """Partial rollouts: rollout/token_staleness_mean (weight versions between the policy
    that sampled each token and the learner, over the step's tokens; a group's staleness
    counts its start), rollout/resumed_frac (samples continued across a weight update)."""
    tokens = stale = resumed = samples = 0
    for g in groups:
        for s in g.samples:
            versions = token_versions(s.version_runs, s.num_tokens, g.policy_version)
            tokens, stale = tokens + s.num_tokens, stale + int((learner_version - versions).sum())
            resumed, samples = resumed + bool(s.version_runs), samples + 1
    return {"rollout/token_staleness_mean": stale / max(1, tokens), "rollout/resumed_frac": resumed / max(1, samples)}


def summarize_rollouts(scored: list) -> dict[str, float]:
    """Reward, correctness and response length by domain for one step's ScoredGroups,
    plus the share of groups with zero reward variance and of truncated responses."""
    out: dict[str, float] = {}
    by_domain: dict[str, list[tuple[float, bool, int, bool]]] = {}
    by_source: dict[str, list[tuple[float, bool]]] = {}
    zero_variance = 0
    timeouts = 0
    math_correct = math_correct_not_number = 0
    custom = {"reward/custom_errors": 0, "reward/custom_timeouts": 0}
    custom_metrics: dict[str, list[float]] = {}
    seen_custom = False
    for sg in scored:
        rewards = sg.rewards
        zero_variance += max(rewards) == min(rewards)
        domain = sg.group.prompt.domain
        rows = by_domain.setdefault(domain, [])
        source_rows = by_source.setdefault(source_metric_name(sg.group.prompt.data_source or domain), [])
        for sample, result in zip(sg.group.samples, sg.results):
            rows.append((result.reward, result.correct, sample.num_tokens, sample.finish_reason == "length"))
            source_rows.append((result.reward, result.correct))
            if result.info.get("custom"):  # scored by a reward plug-in
                seen_custom = True
                custom["reward/custom_timeouts"] += bool(result.info.get("timeout"))
                custom["reward/custom_errors"] += "error" in result.info
                for name, value in result.info.get("metrics", {}).items():
                    custom_metrics.setdefault(name.replace("/", "_"), []).append(value)
                continue
            timeouts += bool(result.info.get("timeout"))
            if domain == "math" and result.correct:
                math_correct += 1
                math_correct_not_number += plain_number(str(result.info.get("answer", ""))) is None
    every = [row for rows in by_domain.values() for row in rows]
    for name, rows in [*by_domain.items(), ("all", every)]:
        if not rows:
            continue
        prefix = "" if name == "all" else f"/{name}"
        out[f"reward{prefix}/mean"] = sum(r[0] for r in rows) / len(rows)
        out[f"correct{prefix}/mean"] = sum(r[1] for r in rows) / len(rows)
        out[f"response_len{prefix}/mean"] = sum(r[2] for r in rows) / len(rows)
        out[f"truncated{prefix}/frac"] = sum(r[3] for r in rows) / len(rows)
    for source, rows in sorted(by_source.items()):
        out[f"reward/source/{source}/mean"] = sum(r[0] for r in rows) / len(rows)
        out[f"correct/source/{source}/mean"] = sum(r[1] for r in rows) / len(rows)
    out["groups/count"] = len(scored)
    out["groups/zero_variance_frac"] = zero_variance / max(1, len(scored))
    out["reward/timeouts"] = timeouts
    if seen_custom:
        out.update(custom)
        out.update({f"reward/custom/{name}/mean": sum(v) / len(v) for name, v in custom_metrics.items()})
    if math_correct:
        out["correct/math/not_number_frac"] = math_correct_not_number / math_correct
    return out


def source_metric_name(data_source: str) -> str:
    """A data source as part of a metric name: characters trackers refuse become `_`
    (`builtin/arithmetic` stays as it is)."""
    return re.sub(r"[^\w./-]", "_", data_source) or "_"


@contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to totals[key] (a phase that runs several times
    in a step or an evaluation sums)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
