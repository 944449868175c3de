"""Group-relative advantages (GRPO): each sample's reward minus its group's mean,
optionally divided by the group's standard deviation.

The standard deviation is the *unbiased* one (Bessel's correction, `torch.std`'s
default), as GRPO implementations use. A group whose rewards are all equal carries
no learning signal: its advantages are exactly 0 (set explicitly, not left to
floating-point cancellation), and it counts in `zero_variance_frac`.
"""
from __future__ import annotations

import torch


def zero_variance_mask(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [G, n] -> BoolTensor [G], True where every reward of the group is equal."""
    _check_rewards(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: torch.Tensor, normalize_by_std: bool,
                     eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """rewards [G, n] (G groups of n samples of one prompt) -> (advantages [G, n], metrics).

    advantage = r - mean(group), divided by (std(group) + eps) if `normalize_by_std`,
    std unbiased (divides by n - 1). Zero-variance groups get exactly 0. The result is
    float32 (or the rewards' float dtype) and carries no gradient.

    metrics (Python floats): zero_variance_frac (share of groups with equal rewards),
    reward_mean, reward_std (over all samples), group_std_mean (mean within-group
    std), adv_abs_mean, num_groups.
    """
    _check_rewards(rewards)
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.to(torch.float32)
    if torch.isnan(r).any():
        raise ValueError("rewards contain NaN; every sample needs a finite reward "
                         "(score failures as 0, not NaN)")
    num_groups, n = r.shape
    constant = zero_variance_mask(r)
    centered = r - r.mean(dim=1, keepdim=True)
    # n == 1: every group is constant; skip torch.std, which would warn and return NaN.
    std = r.std(dim=1, keepdim=True) if n > 1 and num_groups else torch.zeros_like(r[:, :1])
    adv = centered / (std + eps) if normalize_by_std else centered
    adv = torch.where(constant[:, None], torch.zeros_like(adv), adv)
    metrics = {
        "zero_variance_frac": constant.float().mean().item() if num_groups else 0.0,
        "reward_mean": r.mean().item() if r.numel() else 0.0,
        "reward_std": r.std().item() if r.numel() > 1 else 0.0,
        "group_std_mean": std.mean().item() if num_groups else 0.0,
        "adv_abs_mean": adv.abs().mean().item() if r.numel() else 0.0,
        "num_groups": float(num_groups),
    }
    return adv, metrics


def _check_rewards(rewards: torch.Tensor) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 2-D tensor [num_groups, samples_per_group], got {shape}; "
                         f"stack each prompt's n rewards as one row")
    if rewards.shape[1] == 0:
        raise ValueError("rewards has 0 samples per group; each group needs at least one sample")
