"""SRPO's algorithm pieces as pure code (no Ray, no vLLM): group-relative advantages,
the clipped policy loss, the History Resampling ledger and the stage schedule."""
from srpo_ray.algo.advantages import group_advantages, zero_variance_mask
from srpo_ray.algo.ledger import HashCollisionError, HistoryLedger
from srpo_ray.algo.loss import count_denominator, masked_mean, masked_sum, policy_loss
from srpo_ray.algo.stages import StageSchedule, effective_sampling, prompts_per_step

__all__ = [
    "group_advantages", "zero_variance_mask", "policy_loss", "count_denominator", "masked_mean",
    "masked_sum", "HistoryLedger", "HashCollisionError", "StageSchedule", "effective_sampling",
    "prompts_per_step",
]
