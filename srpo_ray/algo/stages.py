"""The stage curriculum (SRPO: stage 1 math only, stage 2 math + code) as a small
state machine. The paper publishes no switch rule, so each stage but the last names
one or more rules; the first that holds switches:

- until_steps:  this many training steps done in the stage,
- until_epochs: this many ledger epochs closed in the stage,
- until_metric / until_threshold: the mean of the metric over the stage's last
  `until_metric_window` steps that reported it is >= the threshold (steps that did not
  report the metric, or reported NaN, are skipped; the window must be full).

Pure: no I/O. The driver calls record_step after every step, record_epoch when the
ledger closes an epoch, and advance() when should_switch() says so.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional, Sequence

from srpo_ray.config.schema import RolloutConfig, StageConfig, TrainerConfig
from srpo_ray.records import Sampling


class StageSchedule:
    def __init__(self, stages: Sequence[StageConfig]):
        if not stages:
            raise ValueError("stages is empty; configure at least one stage (e.g. name: math, domains: [math])")
        for i, stage in enumerate(stages):
            _check_stage(i, stage, is_last=i == len(stages) - 1)
        self.stages = list(stages)
        self._index = 0
        self._total_steps = 0
        self._history: list[dict[str, Any]] = []
        self._reset_counters()

    # ---- reading ---------------------------------------------------------------------------

    @property
    def current(self) -> StageConfig:
        return self.stages[self._index]

    @property
    def index(self) -> int:
        return self._index

    @property
    def is_last(self) -> bool:
        return self._index == len(self.stages) - 1

    @property
    def steps_in_stage(self) -> int:
        return self._steps

    @property
    def epochs_in_stage(self) -> int:
        return self._epochs

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per switch so far: from, to, at_step (global), steps_in_stage,
        epochs_in_stage, reason."""
        return [dict(h) for h in self._history]

    # ---- recording -------------------------------------------------------------------------

    def record_step(self, metrics: dict[str, Any]) -> None:
        """One training step finished with these metrics."""
        self._steps += 1
        self._total_steps += 1
        name = self.current.until_metric
        if name is not None and name in metrics:
            value = float(metrics[name])
            if not math.isnan(value):
                self._metric_window.append(value)

    def record_epoch(self) -> None:
        """The ledger closed an epoch while this stage was current."""
        self._epochs += 1

    # ---- switching -------------------------------------------------------------------------

    def switch_reason(self) -> Optional[str]:
        """Why the current stage should end now (e.g. "until_steps=100"), or None. The
        last stage never ends."""
        if self.is_last:
            return None
        st = self.current
        if st.until_steps is not None and self._steps >= st.until_steps:
            return f"until_steps={st.until_steps}"
        if st.until_epochs is not None and self._epochs >= st.until_epochs:
            return f"until_epochs={st.until_epochs}"
        if st.until_metric is not None and len(self._metric_window) >= st.until_metric_window:
            mean = sum(self._metric_window) / len(self._metric_window)
            if mean >= st.until_threshold:
                return f"{st.until_metric}={mean:.4g}>={st.until_threshold}"
        return None

    def should_switch(self) -> bool:
        return self.switch_reason() is not None

    def advance(self) -> StageConfig:
        """Move to the next stage and return it; counters of the new stage start at 0."""
        if self.is_last:
            raise RuntimeError(f"stage {self.current.name!r} is the last stage; there is nothing to advance to")
        self._history.append({
            "from": self.current.name, "to": self.stages[self._index + 1].name,
            "at_step": self._total_steps, "steps_in_stage": self._steps,
            "epochs_in_stage": self._epochs, "reason": self.switch_reason() or "forced",
        })
        self._index += 1
        self._reset_counters()
        return self.current

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self._index, "stage_names": [s.name for s in self.stages],
            "steps_in_stage": self._steps, "epochs_in_stage": self._epochs,
            "total_steps": self._total_steps, "metric_window": list(self._metric_window),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.stages]
        saved = list(state["stage_names"])
        index = int(state["index"])
        if index >= len(names) or saved[:index + 1] != names[:index + 1]:
            raise ValueError(f"the checkpoint was taken in stage {saved[index]!r} (index {index}) of stages "
                             f"{saved}, but the config's stages are {names}; resume with the same stages "
                             f"(later stages may change)")
        self._index = index
        self._reset_counters()
        self._steps, self._epochs = int(state["steps_in_stage"]), int(state["epochs_in_stage"])
        self._total_steps = int(state["total_steps"])
        self._metric_window.extend(float(v) for v in state["metric_window"])
        self._history = [dict(h) for h in state["history"]]

    def _reset_counters(self) -> None:
        self._steps = 0
        self._epochs = 0
        self._metric_window: deque[float] = deque(maxlen=self.current.until_metric_window)


def effective_sampling(rollout_cfg: RolloutConfig, stage: StageConfig) -> Sampling:
    """n, temperature, top_p, max_new_tokens: the rollout config with the stage's
    overrides (fields that are not None) applied; no seed (each call sets its own)."""
    def pick(name: str) -> Any:
        override = getattr(stage, name, None)
        return getattr(rollout_cfg, name) if override is None else override

    return Sampling(**{name: pick(name) for name in ("n", "temperature", "top_p", "max_new_tokens")})


def prompts_per_step(trainer_cfg: TrainerConfig, stage: StageConfig) -> int:
    """trainer.prompts_per_step, or the stage's override."""
    return int(stage.prompts_per_step if stage.prompts_per_step is not None else trainer_cfg.prompts_per_step)


def _check_stage(i: int, st: StageConfig, is_last: bool) -> None:
    key = f"stages.{i} ({st.name!r})"

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{key}.{field}: {why}")

    need(st.until_steps is None or st.until_steps >= 1, "until_steps", "must be >= 1 (or unset)")
    need(st.until_epochs is None or st.until_epochs >= 1, "until_epochs", "must be >= 1 (or unset)")
    need((st.until_metric is None) == (st.until_threshold is None), "until_metric",
         "until_metric and until_threshold go together")
    need(st.until_metric_window >= 1, "until_metric_window", "must be >= 1")
    has_rule = st.until_steps is not None or st.until_epochs is not None or st.until_metric is not None
    need(is_last or has_rule, "until_steps", "every stage but the last needs a switch rule "
         "(until_steps, until_epochs, or until_metric + until_threshold)")
    need(st.n is None or st.n >= 2, "n", "group-relative advantages need at least 2 samples per prompt")
    need(st.temperature is None or st.temperature > 0, "temperature", "must be > 0")
    need(st.top_p is None or 0 < st.top_p <= 1, "top_p", "must be in (0, 1]")
    need(st.max_new_tokens is None or st.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    need(st.prompts_per_step is None or st.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
