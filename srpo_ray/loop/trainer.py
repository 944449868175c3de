"""The SRPO training loop over role handles.

`SRPOTrainer` owns the run's state (step, policy version, ledger, stage schedule) and
calls the roles through small objects built by the runtime: a rollout fleet, a reward
fleet and a learner group. It imports neither Ray nor vLLM, so tests can drive it with
fakes. One step: prompts from the ledger -> rollouts -> rewards -> ledger update ->
group advantages -> learner update -> weights pushed to the generators. How many rounds
of rollouts a step runs is the batch collector's business (srpo_ray/loop/collect.py: one
round, or DAPO-style dynamic sampling), chosen when the trainer is built. When a step's
rollouts are collected is the pipeline's (srpo_ray/loop/pipeline.py): just before the step
trains, or, with rollout.steps_ahead = k > 0, up to k steps ahead while earlier steps
train. Everything that draws prompts or records rewards happens in `collect`, through the
prompt schedule (srpo_ray/loop/prompt_schedule.py: ledger and curriculum stages); `update` turns one step's rollouts into a learner update, `_push_latest`
hands the newest weights to the generators between two collections. Rollout seeds:
records.rollout_seed.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from srpo_ray.algo.advantages import group_advantages
from srpo_ray.algo.ledger import HistoryLedger
from srpo_ray.algo.overlong import apply_overlong_policy
from srpo_ray.algo.stages import StageSchedule, effective_sampling, prompts_per_step
from srpo_ray.config.load import SRPOConfig, to_yaml
from srpo_ray.eval.report import headline, write_json
from srpo_ray.learner.plan import TrainRows, select_train_rows
from srpo_ray.loop.checkpoint import CheckpointManager
from srpo_ray.loop.collect import Collected, make_collector
from srpo_ray.loop.pipeline import BLOCKED, RolloutPipeline
from srpo_ray.loop.prompt_schedule import PromptSchedule
from srpo_ray.loop.stop import StopRequest
from srpo_ray.records import Prompt, RolloutGroup, Sampling, ScoredGroup, here, rollout_seed
from srpo_ray.telemetry.metrics import MetricsLogger, summarize_rollouts, timed, token_staleness

STATE_FILE = "trainer_state.pt"
EVAL_FILE = "eval.json"  # in a checkpoint: the evaluation of its weights, when one ran at its step


class RolloutFleet(Protocol):
    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[RolloutGroup]: ...
    def push_weights(self, weights: Any, version: int) -> None: ...
    def pop_metrics(self) -> dict: ...


class RewardFleet(Protocol):
    def score(self, groups: list[RolloutGroup]) -> list[ScoredGroup]: ...


class Learner(Protocol):
    def train(self, rows: TrainRows, temperature: float) -> dict: ...
    def publish_weights(self) -> Any: ...
    def save(self, directory: str) -> None: ...
    def load(self, directory: str) -> None: ...


@dataclass
class StepRollouts:
    """One step's scored rollouts and what the trainer knew when it collected them:
    the sampling settings (the stage's), the rollout, collection, ledger and stage
    metrics, and the seconds spent generating and scoring."""

    step: int
    collected: Collected
    sampling: Sampling
    metrics: dict[str, Any]
    timings: dict[str, float]


@dataclass
class StepUpdate:
    """What one step's update left for the weight push and the step's metrics: whether
    anything was learned (a batch of `sequences`), each rollout group's staleness (policy
    versions behind the learner), and the metrics and timings so far."""

    rollouts: StepRollouts
    learned: bool
    sequences: int
    staleness: list[int]
    metrics: dict[str, Any]
    timings: dict[str, float]


@dataclass
class Roles:
    """fetch returns groups with their tokens and texts here in the driver, for the few
    it writes to rollouts.jsonl (the fleet's fetch, when they stay in Ray's object store)."""

    rollout: RolloutFleet
    rewards: RewardFleet
    learner: Learner
    fetch: Callable[[list[RolloutGroup]], list[RolloutGroup]] = here


class Evaluation(Protocol):
    def run(self) -> Any: ...


class SRPOTrainer:
    def __init__(self, cfg: SRPOConfig, prompts: list[Prompt], roles: Roles, pad_token_id: int,
                 metrics: MetricsLogger, checkpoints: CheckpointManager, evaluator: Evaluation | None = None):
        """evaluator: runs held-out evaluation on the generators' current weights
        (srpo_ray/eval/runner.py); None: no evaluation."""
        self.cfg, self.roles, self.pad_token_id = cfg, roles, pad_token_id
        self.metrics, self.checkpoints, self.evaluator = metrics, checkpoints, evaluator
        self.last_eval: Any = None  # the newest EvalReport, saved with a checkpoint of its step
        self.prompts = PromptSchedule(cfg, prompts, metrics.event)  # ledger + curriculum stages
        self.collector = make_collector(cfg.algo)
        self.step = 0
        self.version = 0  # number of weight updates the generators have received
        self._saved_step = -1
        self._pushed_version = 0  # the version the generators hold
        self._push_timings: dict[str, float] = {}  # of pushes since the last step's metrics
        self.stop_request = StopRequest()  # set by the driver's SIGTERM handler (srpo_ray/loop/stop.py)
        self.stopped = False  # fit returned early on stop_request, after saving a checkpoint

    @property
    def ledger(self) -> HistoryLedger:
        return self.prompts.ledger

    @property
    def stages(self) -> StageSchedule:
        return self.prompts.stages

    # ---- the loop -------------------------------------------------------------------
    def fit(self) -> None:
        if self.step == 0:
            self.prompts.start()
            if self.cfg.eval.at_start and not self.stop_request.requested:
                self.evaluate()
        # Collection runs in the pipeline's thread, up to rollout.steps_ahead steps ahead
        # (0: just before the step trains); it pushes new weights only between collections
        # and admits a step only if it can train within steps_ahead versions of the
        # weights that sample it (srpo_ray/loop/pipeline.py).
        partial = self.cfg.rollout.partial_rollouts  # a push pauses a running collection
        pipeline = RolloutPipeline(self.collect, self._push_latest, self.cfg.rollout.steps_ahead,
                                   may_start=self._may_collect, version=self.version, trained=self.step,
                                   interrupt=self.roles.rollout.interrupt if partial else None)
        if partial:
            self.roles.rollout.on_pause = pipeline.pause_for_push
        try:
            while self.step < self.cfg.trainer.total_steps:
                if self._stop_now(pipeline):
                    self.stopped = True
                    break
                started = time.perf_counter()
                rollouts = pipeline.take(self.step + 1)  # collected ahead, or now
                if rollouts is BLOCKED:  # a stop came before the step's collection started
                    if not self.stop_request.requested:
                        raise RuntimeError(f"step {self.step + 1} cannot be collected, yet no stop was requested")
                    continue
                if rollouts is None:
                    self.metrics.event(f"step {self.step}: no prompts left in the pool (all solved); stopping")
                    break
                self.step += 1
                with pipeline.training():
                    update = self.update(rollouts, started)  # the learner trains
                self.version += update.learned
                evaluating = self._eval_due(self.step) and not self.stop_request.requested
                self._after_training(pipeline, update, hold=evaluating)  # the weight push, when the generators allow
                self.metrics.log(self.step, self._step_metrics(update, started, pipeline))
                if evaluating:  # the generators hold this version and nothing collects
                    self.evaluate()
                if self._save_due(self.step):
                    self.save()
                pipeline.done(self.step)
        finally:
            pipeline.close()  # a step that failed may leave a collection running
        if self._pushed_version != self.version:  # the generators are behind (steps_ahead >= 2)
            self._push_latest()
        if self.cfg.eval.at_end and not self._evaluated_now() and not self.stop_request.requested:
            self.evaluate()
        if self._saved_step != self.step:  # never re-write (and briefly lose) the newest checkpoint
            self.save()

    def evaluate(self) -> Any:
        """Held-out evaluation of the generators' current weights (version self.version),
        logged at the current step; None without an evaluator. Touches no training state."""
        if self.evaluator is None:
            return None
        self.metrics.event(f"step {self.step}: evaluating held-out problems")
        report = self.evaluator.run()
        report.step = self.step
        if report.policy_version != self.version:
            raise RuntimeError(f"evaluation at step {self.step} sampled policy version {report.policy_version}, "
                               f"not the learner's {self.version}")
        self.last_eval = report
        write_json(report.to_json(), self.eval_dir / f"step_{self.step:06d}.json")
        self.metrics.log_eval(self.step, report.metrics(), headline(report))
        return report

    @property
    def eval_dir(self) -> Path:
        return Path(self.cfg.trainer.run_dir) / "eval"

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return (bool(every) and step % every == 0) or (self.cfg.eval.at_end and step == self.cfg.trainer.total_steps)

    def _evaluated_now(self) -> bool:
        return self.evaluator is None or (self.last_eval is not None and self.last_eval.step == self.step)

    def collect(self, step: int) -> StepRollouts | None:
        """Draw step `step`'s prompts, generate, score and record them in the ledger and
        the stage schedule; None when no prompts are left. Runs ahead of the training
        loop with rollout.steps_ahead > 0 (srpo_ray/loop/pipeline.py)."""
        prompt_ids, epoch_metrics = self.prompts.next_ids(step)
        if not prompt_ids:
            return None
        timings: dict[str, float] = {}
        stage = self.stages.current
        sampling = effective_sampling(self.cfg.rollout, stage)
        collected = self.collector.collect(
            prompt_ids, prompts_per_step(self.cfg.trainer, stage),
            draw=lambda k: self.prompts.draw_more(step, k, epoch_metrics),
            run_round=lambda ids, round_index: self._rollout_round(step, ids, round_index, sampling, timings))
        metrics = self.prompts.step_metrics({**summarize_rollouts(collected.generated), **collected.metrics,
                                             **{f"epoch/{k}": v for k, v in epoch_metrics.items()}},
                                            collected.generated)
        return StepRollouts(step, collected, sampling, metrics, timings)

    def update(self, rollouts: StepRollouts, started: float) -> StepUpdate:
        """Advantages and the learner update for one step's rollouts. `started`: when the
        step began waiting for them."""
        timings = {"wait_rollouts": time.perf_counter() - started, **rollouts.timings}
        sampling, scored = rollouts.sampling, rollouts.collected.train
        shaped, overlong_metrics = apply_overlong_policy(scored, self.cfg.algo.overlong, sampling.max_new_tokens)
        # [G, n]; G is 0 when dynamic sampling kept no group
        rewards = torch.tensor(shaped, dtype=torch.float32).reshape(len(shaped), sampling.n)
        advantages, adv_metrics = group_advantages(rewards, self.cfg.algo.normalize_adv_by_std)
        rows = select_train_rows(scored, advantages.tolist(), self.pad_token_id)  # lengths only: no tokens here
        generated = rollouts.collected.generated
        staleness = [self.version - sg.group.policy_version for sg in generated]
        logged = generated[:max(0, self.cfg.metrics.rollouts_per_step)]
        fetched = self.roles.fetch([sg.group for sg in logged])
        self.metrics.rollouts(self.step, [ScoredGroup(g, sg.results) for g, sg in zip(fetched, logged)],
                              learner_version=self.version)
        train_metrics: dict[str, Any] = {"train/skipped": 1.0}
        learned = rows.num_sequences > 0  # all groups zero-variance: nothing to learn from
        if learned:
            with timed(timings, "train"):
                train_metrics = self.roles.learner.train(rows, temperature=sampling.temperature)
        metrics = {**rollouts.metrics, **{f"adv/{k}": v for k, v in adv_metrics.items()}, **overlong_metrics,
                   **train_metrics}
        if self.cfg.rollout.partial_rollouts:  # per-token versions exist only then
            metrics.update(token_staleness([sg.group for sg in generated], self.version))
        return StepUpdate(rollouts, learned, rows.num_sequences, staleness, metrics, timings)

    def _after_training(self, pipeline: RolloutPipeline, update: StepUpdate, hold: bool) -> None:
        """Tell the pipeline the step trained; it pushes the new weights now if the
        generators are between collections (or will be before the next step could train)."""
        pushed = self._push_timings.get("weight_sync", 0.0)
        waited = time.perf_counter()
        pipeline.trained(self.step, self.version, hold=hold)
        update.timings["wait_collect_ahead"] = (time.perf_counter() - waited
                                                - (self._push_timings.get("weight_sync", 0.0) - pushed))

    def _push_latest(self) -> None:
        """The learner's weights (version self.version) to every generator. Called by the
        pipeline while no collection runs, and at the run's end; timings go to the next
        step's metrics."""
        with timed(self._push_timings, "weight_sync"):  # = weight_publish + delivery (of which weight_load)
            with timed(self._push_timings, "weight_publish"):
                published = self.roles.learner.publish_weights()
            self.roles.rollout.push_weights(published, self.version)
        self._pushed_version = self.version

    def _step_metrics(self, update: StepUpdate, started: float, pipeline: RolloutPipeline) -> dict[str, Any]:
        update.timings.update(self._push_timings)
        self._push_timings = {}
        update.timings["step"] = time.perf_counter() - started
        staleness = update.staleness
        return {
            **update.metrics, **{f"time/{k}": v for k, v in update.timings.items()},
            **self.roles.rollout.pop_metrics(), **pipeline.pop_idle(),
            "rollout/staleness_mean": sum(staleness) / max(1, len(staleness)),
            "rollout/staleness_max": max(staleness, default=0),
            "policy/version": self.version, "batch/sequences": update.sequences,
        }

    def _rollout_round(self, step: int, prompt_ids: list[str], round_index: int, sampling: Sampling,
                       timings: dict[str, float]) -> list[ScoredGroup]:
        """Generate and score one round of the step; every group is recorded in the
        ledger, whether or not the collector keeps it."""
        prompts = [self.prompts.by_id[i] for i in prompt_ids]
        seeded = sampling.with_seed(rollout_seed(self.cfg.rollout.seed, step, round_index))
        with timed(timings, "generate"):
            groups = self.roles.rollout.generate(prompts, seeded)
        self._check_versions(groups)
        with timed(timings, "score"):
            scored = self.roles.rewards.score(groups)
        self.prompts.observe(scored)
        return scored

    def _may_collect(self, step: int, done: int) -> bool:
        """Whether step `step` may be collected now that steps up to `done` are over: not
        past the last step; not past a step that saves a checkpoint before it is saved (a
        checkpoint holds no untrained rollouts); none once a stop is requested."""
        if step > self.cfg.trainer.total_steps:
            return False
        if self.stop_request.requested:
            return False
        return not any(self._save_due(s) for s in range(done + 1, step))

    def _stop_now(self, pipeline: RolloutPipeline) -> bool:
        """Whether a requested stop ends the loop here, at a step's end. Steps collected
        ahead before the request came are trained first: their prompts and outcomes are in
        the ledger already, and a checkpoint must not hold rollouts no step trained on (nor
        can it drop them: the ledger has no undo). So with rollout.steps_ahead the
        checkpoint may come a step or more later; it is then the one a save_every step there
        would write, and --resume continues from it exactly as from that one. Evaluations
        due while stopping are skipped: they would spend the grace period."""
        if not self.stop_request.requested or pipeline.holds_untrained:
            return False
        self.metrics.event(f"step {self.step}: stopping ({self.stop_request.reason}): saving a checkpoint")
        return True

    def _save_due(self, step: int) -> bool:
        return bool(self.cfg.trainer.save_every) and step % self.cfg.trainer.save_every == 0

    def _check_versions(self, groups: list[RolloutGroup]) -> None:
        oldest = self.version - self.cfg.rollout.max_staleness  # the fleet regenerates older ones
        stale = [g.policy_version for g in groups if not oldest <= g.policy_version <= self.version]
        if stale:
            raise RuntimeError(f"rollouts from policy versions {sorted(set(stale))} but the learner is at "
                               f"version {self.version} (rollout.max_staleness={self.cfg.rollout.max_staleness}):"
                               f" a generation worker missed a weight update")

    # ---- checkpoints ----------------------------------------------------------------
    def save(self) -> Path:
        tmp = self.checkpoints.begin(self.step)
        self.roles.learner.save(str(tmp))
        torch.save(self.state_dict(), tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(to_yaml(self.cfg))
        if self.last_eval is not None and self.last_eval.step == self.step:
            (tmp / EVAL_FILE).write_text(json.dumps(self.last_eval.to_json(), indent=1))
        final = self.checkpoints.commit(tmp, self.step)
        self._saved_step = self.step
        self.metrics.event(f"step {self.step}: checkpoint {final}")
        return final

    def resume(self) -> Path | None:
        """Continue from the latest checkpoint, if any: learner weights and optimizer,
        ledger, stage, step, policy version and RNG states; generators get the weights."""
        self.checkpoints.clean_partial()
        latest = self.checkpoints.latest()
        if latest is None:
            self.metrics.event(f"--resume: no checkpoint in {self.checkpoints.root}; starting fresh")
            return None
        self.roles.learner.load(str(latest))
        self.load_state_dict(torch.load(latest / STATE_FILE, weights_only=False))
        self._push_latest()
        self._push_timings = {}
        self.metrics.start_at(self.step)
        self.metrics.event(f"resumed from {latest} at step {self.step} (stage {self.stages.index}, "
                           f"epoch {self.ledger.epoch}, policy version {self.version})")
        return latest

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "version": self.version,
            **self.prompts.state_dict(),  # "ledger", "stages"
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.version = state["step"], state["version"]
        self._saved_step = self.step  # this state is the checkpoint it came from
        self.prompts.load_state_dict(state)
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])

