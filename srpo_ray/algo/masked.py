"""Reductions over the real response tokens of a padded [B, T] batch, and the bound on
log-ratios before exp(), shared by the policy loss (loss.py) and the off-policy
corrections (offpolicy.py)."""
from __future__ import annotations

import torch

# exp() of a log-ratio beyond this overflows to inf in float32 and turns the loss into
# inf/NaN; a ratio of e^20 is clipped or meaningless anyway.
LOG_RATIO_LIMIT = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true (over `dim`, or everything). Masked-out entries are
    replaced, not multiplied, so NaN/inf in padding cannot leak in."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true; 0 where nothing is selected."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)
