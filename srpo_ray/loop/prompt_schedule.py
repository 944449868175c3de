"""Which prompts each step trains on: the History Resampling ledger over the current
curriculum stage's pool, drawn by source weight where the stage sets one.

`PromptSchedule` owns the ledger (srpo_ray/algo/ledger.py) and the stage schedule
(srpo_ray/algo/stages.py) and joins them: an epoch that closes while a step draws its
prompts applies History Resampling and counts towards the stage's epochs; a stage that
is due (or whose pool is empty) hands over to the next one before the step draws. It is
pure Python, like the trainer that calls it (srpo_ray/loop/trainer.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from srpo_ray.algo.ledger import HistoryLedger
from srpo_ray.algo.source_mix import check_source_weights, stage_source_weights
from srpo_ray.algo.stages import StageSchedule, prompts_per_step
from srpo_ray.config.schema import SRPOConfig
from srpo_ray.data.pass_rates import outcomes_for, read_outcomes
from srpo_ray.records import Prompt, ScoredGroup


class PromptSchedule:
    def __init__(self, cfg: SRPOConfig, prompts: list[Prompt], event: Callable[[str], None]):
        """event: writes a one-off line to the run's log (epoch ends, stage switches)."""
        self.cfg, self.event = cfg, event
        self.by_id = {p.prompt_id: p for p in prompts}
        check_source_weights(cfg, prompts)
        self.ledger = HistoryLedger(cfg.resample, seed=cfg.trainer.seed)
        self.stages = StageSchedule(cfg.stages)
        self._weighted_sources: list[str] = []  # the current stage's, when it draws by source weight

    def start(self) -> None:
        """A fresh run: the ledger seeded from the difficulty pre-pass (if configured),
        then the first stage's pool."""
        if self.cfg.resample.seed_from:
            self._seed_ledger()
        self._enter_stage(first=True)

    def next_ids(self, step: int) -> tuple[list[str], dict]:
        """Step `step`'s prompt ids ([] when every stage's pool is empty) and the History
        Resampling metrics of an epoch that closed while drawing them ({} if none)."""
        epoch_metrics: dict = {}
        while True:
            if self._switch_due():
                self._enter_stage(first=False, step=step)
            ids = self._take(step, prompts_per_step(self.cfg.trainer, self.stages.current), epoch_metrics)
            if self._switch_due():  # an epoch just closed and ended the stage
                continue
            if ids:
                return ids, epoch_metrics
            if self.stages.is_last:
                return [], epoch_metrics
            self._enter_stage(first=False, step=step)  # this stage's pool is empty: move on

    def draw_more(self, step: int, k: int, epoch_metrics: dict) -> list[str]:
        """Up to k more prompt ids within step `step` (dynamic sampling). A stage switch
        waits for the next step, so a step never mixes two stages' settings: [] when one
        is due."""
        if self._switch_due():
            return []
        ids = self._take(step, k, epoch_metrics)
        return [] if self._switch_due() else ids

    def observe(self, scored: Iterable[ScoredGroup]) -> None:
        """Record rollout outcomes in the ledger (every group, kept for training or not)."""
        for sg in scored:
            self.ledger.observe(sg.group.prompt.prompt_id, sg.num_correct, len(sg.results))

    def step_metrics(self, step_metrics: dict[str, Any], generated: list[ScoredGroup]) -> dict[str, Any]:
        """Pool, epoch and stage metrics of a collected step, and the source mix of its
        groups; then the stage rules see the step's rollout metrics (`step_metrics`)."""
        metrics = {**step_metrics, **self._source_mix_metrics(generated),
                   "pool/size": self.ledger.pool_size, "pool/removed": self.ledger.num_removed,
                   "epoch": self.ledger.epoch, "stage": self.stages.index}
        self.stages.record_step(metrics)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "stages": self.stages.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.stages.load_state_dict(state["stages"])
        pool, weights = self._stage_pool()  # the weighting is config: re-attached, not saved
        if weights:
            self.ledger.use_source_weights(pool, [self.by_id[i].data_source for i in pool], weights)

    # ---- internals ------------------------------------------------------------------
    def _take(self, step: int, k: int, epoch_metrics: dict) -> list[str]:
        ids, closed = self.ledger.next_batch(k)
        if closed:  # History Resampling was applied at this epoch's end
            epoch_metrics.update(closed)
            self.event(f"before step {step}: epoch end, History Resampling: "
                       + ", ".join(f"{k}={v}" for k, v in closed.items()))
            self.stages.record_epoch()
        return ids

    def _switch_due(self) -> bool:
        return self.stages.should_switch() and not self.stages.is_last

    def _seed_ledger(self) -> None:
        outcomes = outcomes_for(list(self.by_id.values()), read_outcomes(self.cfg.resample.seed_from))
        seeded = self.ledger.seed_history(outcomes)
        self.event(f"ledger seeded from {self.cfg.resample.seed_from}: {seeded['observed']} of "
                   f"{len(self.by_id)} prompts as epoch 0, {seeded['dropped']} all-correct removed")

    def _enter_stage(self, first: bool, step: int = 0) -> None:
        if not first:
            self.stages.advance()
        stage = self.stages.current
        pool, weights = self._stage_pool()
        if weights:
            self.ledger.set_pool(pool, [self.by_id[i].data_source for i in pool], weights)
        else:
            self.ledger.set_pool(pool)
        self.event(f"from step {step + 1}: stage {self.stages.index} ({stage.name}): "
                   f"{len(pool)} prompts in domains {list(stage.domains)}"
                   + (f", sources drawn by weight {weights}" if weights else ""))

    def _stage_pool(self) -> tuple[list[str], dict[str, float]]:
        """The current stage's prompt ids and source weights ({}: unweighted); sources of
        weight 0 are left out (check_source_weights made sure every source has one).
        Remembers the sources drawn by weight, for the data/source_frac metrics."""
        stage = self.stages.current
        weights = stage_source_weights(self.cfg.data, stage)
        pool = [pid for pid, p in self.by_id.items()
                if p.domain in stage.domains and (not weights or weights[p.data_source] > 0)]
        self._weighted_sources = sorted({self.by_id[i].data_source for i in pool}) if weights else []
        return pool, weights

    def _source_mix_metrics(self, generated: list[ScoredGroup]) -> dict[str, float]:
        """data/source_frac/<source>: share of the step's groups from each source the
        stage draws by weight (0 for one not drawn this step, so means over steps are fair)."""
        if not self._weighted_sources:
            return {}
        counts = dict.fromkeys(self._weighted_sources, 0)
        for sg in generated:
            source = sg.group.prompt.data_source
            counts[source] = counts.get(source, 0) + 1
        total = max(1, len(generated))
        return {f"data/source_frac/{s}": c / total for s, c in counts.items()}
