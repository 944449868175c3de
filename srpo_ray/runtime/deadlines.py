"""How long a generation or reward worker may take to answer one chunk before the pool
takes it as hung (srpo_ray/runtime/worker_pool.py kills and replaces it and re-issues the
chunk): a floor (rollout.hung_after_s, reward.hung_after_s) plus a share per unit of
the chunk's work. The share is taken at the most work a chunk of that size may carry
in this run (the largest n and max_new_tokens of any stage or evaluation), because a
chunk does not say which stage or evaluation it belongs to: a generous bound, never a
tight one, since a false alarm costs a worker and redoes the chunk."""
from __future__ import annotations

from typing import Sized

from srpo_ray.algo.stages import effective_sampling
from srpo_ray.config.schema import SRPOConfig
from srpo_ray.rewards.plugins import HARD_SLACK_S
from srpo_ray.runtime.worker_pool import ChunkSeconds


def generation_chunk_seconds(cfg: SRPOConfig) -> ChunkSeconds | None:
    """A chunk of prompts -> seconds; None when rollout.hung_after_s is 0 (no deadline)."""
    floor, per_token = cfg.rollout.hung_after_s, cfg.rollout.hung_after_s_per_token
    if floor <= 0:
        return None
    sampling = [effective_sampling(cfg.rollout, stage) for stage in cfg.stages]
    longest = max([s.max_new_tokens for s in sampling] + [cfg.eval.max_new_tokens])
    tokens_per_prompt = most_samples(cfg) * longest

    def seconds(prompts: Sized) -> float:
        return floor + per_token * tokens_per_prompt * len(prompts)

    return seconds


def reward_chunk_seconds(cfg: SRPOConfig) -> ChunkSeconds | None:
    """A chunk of groups to score -> seconds; None when reward.hung_after_s is 0."""
    reward = cfg.reward
    if reward.hung_after_s <= 0:
        return None
    per_response = reward.hung_after_s_per_response
    if per_response is None:  # every check running to its limit, one after another
        per_response = max(reward.math_timeout_s, reward.code_total_timeout_s, reward.custom_timeout_s) + HARD_SLACK_S
    responses_per_group = most_samples(cfg)

    def seconds(groups: Sized) -> float:
        return reward.hung_after_s + per_response * responses_per_group * len(groups)

    return seconds


def most_samples(cfg: SRPOConfig) -> int:
    """The most samples a prompt gets in any stage or evaluation."""
    return max([effective_sampling(cfg.rollout, stage).n for stage in cfg.stages] + [cfg.eval.k])
