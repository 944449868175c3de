"""Off-policy corrections: how much each response token's policy gradient counts when the
tokens were sampled by another policy than the one its advantage belongs to (stale
weights, bf16 kernels, a truncated sampler). Chosen by algo.tis_cap and algo.offpolicy
(srpo_ray/config/schema_algo.py OffPolicyConfig: when to use which); loss.py applies them.
Pure torch.

Notation as in loss.py: B sequences, T response positions, `mask` [B, T] the real
response tokens. old [B, T]: the learner's log-probs of the policy the advantages belong
to; rollout [B, T]: the sampler's (vLLM's processed log-probs: softmax(logits / T)
renormalised over the top-p nucleus, the distribution it actually drew from). Per token
and per sequence:

    log w_t = old_t - rollout_t          w_t: learner-old over sampler
    w_seq   = exp(sum_t log w_t)         the sequence's importance weight
    w_geo   = exp(mean_t log w_t)        its geometric-mean token ratio

Order (`correct`): every statistic comes from the raw log w_t of all the sequence's
response tokens; the masks intersect; on the kept tokens the weights multiply:

    weight_t = kept_t x min(w_t, tis_cap) x min(w_seq, seq_is_cap)
    kept_t   = w_t in [token_mask_low, token_mask_high]                 (token_mask: IcePop)
               and w_seq in [seq_is_low, seq_is_high]                   (seq_is=mask)
               and w_geo in [geo_mask_low, geo_mask_high]               (geo_mask)

each factor 1 (each condition true) when its correction is off. loss.py multiplies the
token's policy-gradient term by weight_t; a masked token keeps its place in the loss
denominator and contributes 0 (as IcePop), so masking never scales up the others.
Weights are float32 and detached; log-ratios are clamped to LOG_RATIO_LIMIT before exp,
and masks compare on the log scale, so nothing overflows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from srpo_ray.algo.masked import LOG_RATIO_LIMIT, masked_mean, masked_sum
from srpo_ray.config.schema import AlgoConfig

METRIC_PREFIX = "offpolicy"


def token_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """log w_t = old - rollout [B, T], float32, no grad; 0 outside `mask`, so whatever
    padding holds never reaches a sum."""
    gap = old_logprobs.detach().float() - rollout_logprobs.detach().float()
    return torch.where(mask.bool(), gap, torch.zeros((), dtype=gap.dtype, device=gap.device))


def truncated_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(log_ratio), cap), elementwise: truncated importance sampling."""
    return torch.exp(log_ratio.clamp(max=LOG_RATIO_LIMIT)).clamp(max=cap)


def within(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """exp(log_ratio) in [low, high], compared as logs (no exp, no overflow)."""
    return (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))


def token_tis_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level TIS (algo.tis_cap): min(w_t, cap) [B, T]."""
    return truncated_weight(log_ratio, cap)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log w_seq = sum_t log w_t over each sequence's response tokens [B]."""
    return masked_sum(log_ratio, mask, dim=-1)


def sequence_is_weight(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """seq_is=truncate: min(w_seq, cap) [B], the weight of every token of the sequence."""
    return truncated_weight(sequence_log_ratio(log_ratio, mask), cap)


def sequence_is_kept(log_ratio: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """seq_is=mask: w_seq in [low, high] [B] (False: the sequence is dropped)."""
    return within(sequence_log_ratio(log_ratio, mask), low, high)


def token_mask_kept(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """token_mask (IcePop): w_t in [low, high] [B, T] (False: no gradient for that token)."""
    return within(log_ratio, low, high)


def geometric_kept(log_ratio: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """geo_mask: w_geo = exp(mean_t log w_t) in [low, high] [B] (False: dropped)."""
    return within(masked_mean(log_ratio, mask, dim=-1), low, high)


@dataclass
class Correction:
    """What `correct` decided for one [B, T] call."""

    weight: torch.Tensor | None
    """[B, T] float32 factor of each token's policy-gradient term (0 where masked), or
    None when every correction is off (the factor would be 1 everywhere)."""
    token_dropped: torch.Tensor
    """[B, T] bool: response tokens left without policy gradient by any mask."""
    seq_dropped: torch.Tensor
    """[B] bool: sequences dropped by a sequence mask (seq_is=mask, geo_mask)."""
    seq_weight: torch.Tensor | None
    """[B] min(w_seq, seq_is_cap) with seq_is=truncate, else None."""


def any_correction(cfg: AlgoConfig) -> bool:
    off = cfg.offpolicy
    return cfg.tis_cap > 0 or off.seq_is != "off" or off.token_mask or off.geo_mask


def correct(log_ratio: torch.Tensor, mask: torch.Tensor, cfg: AlgoConfig) -> Correction:
    """The corrections cfg asks for, in the module docstring's order. log_ratio [B, T]
    from `token_log_ratio`; mask [B, T] the response tokens."""
    off, mask = cfg.offpolicy, mask.bool()
    seq_kept = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    if off.seq_is == "mask":
        seq_kept &= sequence_is_kept(log_ratio, mask, off.seq_is_low, off.seq_is_high)
    if off.geo_mask:
        seq_kept &= geometric_kept(log_ratio, mask, off.geo_mask_low, off.geo_mask_high)
    kept = mask & seq_kept[:, None]
    if off.token_mask:
        kept &= token_mask_kept(log_ratio, off.token_mask_low, off.token_mask_high)
    seq_weight = sequence_is_weight(log_ratio, mask, off.seq_is_cap) if off.seq_is == "truncate" else None

    weight = None
    if any_correction(cfg):
        weight = kept.float()
        if cfg.tis_cap > 0:
            weight = weight * token_tis_weight(log_ratio, cfg.tis_cap)
        if seq_weight is not None:
            weight = weight * seq_weight[:, None]
    return Correction(weight=weight, token_dropped=mask & ~kept, seq_dropped=~seq_kept, seq_weight=seq_weight)


def offpolicy_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, correction: Correction,
                      domains: Sequence[str] | None = None) -> dict[str, float]:
    """The gap between sampler and learner-old, and what the corrections dropped, over
    this call's response tokens: offpolicy/k3_kl (k3 estimate of KL(sampler ||
    learner-old) per token: w - 1 - log w, unbiased under the sampler's tokens),
    ratio_mean, ratio_max (of w_t), masked_token_frac, masked_seq_frac, and with
    seq_is=truncate seq_is_weight_mean; with `domains` (one name per sequence) the same
    but ratio_max per domain, offpolicy/<domain>/... Each comes with the counts it is a
    mean over (num_tokens; num_seqs for the per-sequence ones), so calls combine exactly."""
    mask = mask.bool()
    out = _stats(log_ratio, mask, correction, torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device),
                 METRIC_PREFIX)
    if domains:
        if len(domains) != mask.shape[0]:
            raise ValueError(f"domains names {len(domains)} sequences but the batch has {mask.shape[0]}; "
                             "pass one prompt domain per sequence")
        for domain in sorted(set(domains)):
            rows = torch.tensor([d == domain for d in domains], dtype=torch.bool, device=mask.device)
            stats = _stats(log_ratio, mask, correction, rows, f"{METRIC_PREFIX}/{domain}")
            stats.pop(f"{METRIC_PREFIX}/{domain}/ratio_max")
            out.update(stats)
    return out


@torch.no_grad()
def _stats(log_ratio: torch.Tensor, mask: torch.Tensor, correction: Correction, rows: torch.Tensor,
           prefix: str) -> dict[str, float]:
    tokens = mask & rows[:, None]
    seqs = tokens.any(dim=-1)
    # the ratio as the loss sees it: clamped, so k3 stays finite
    log_w = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    w = torch.exp(log_w)
    num_tokens = int(tokens.sum().item())
    out = {
        f"{prefix}/k3_kl": masked_mean(w - 1.0 - log_w, tokens).item(),
        f"{prefix}/ratio_mean": masked_mean(w, tokens).item(),
        f"{prefix}/ratio_max": w[tokens].max().item() if num_tokens else 0.0,
        f"{prefix}/masked_token_frac": masked_mean(correction.token_dropped.float(), tokens).item(),
        f"{prefix}/masked_seq_frac": masked_mean(correction.seq_dropped.float(), seqs).item(),
        f"{prefix}/num_tokens": float(num_tokens),
        f"{prefix}/num_seqs": float(seqs.sum().item()),
    }
    if correction.seq_weight is not None:
        out[f"{prefix}/seq_is_weight_mean"] = masked_mean(correction.seq_weight, seqs).item()
    return out
