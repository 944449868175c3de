"""The SRPO/GRPO policy loss: PPO's clipped surrogate with separate lower and upper
clip, aggregated so that micro-batches on many ranks add up to one batch loss.

Notation: B sequences, T response positions (padded); `response_mask` [B, T] marks the
real response tokens. All per-token inputs are [B, T]; advantages are [B] (one per
sequence, broadcast over its tokens) or [B, T].

Per response token, with ratio = exp(logprobs - old_logprobs) and advantage A:

    pg   = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)  x offpolicy weight
    tok  = pg + kl_coef * k3(ref || policy) - entropy_coef * entropy

so with A > 0 the ratio is clipped only above 1 + eps_high, with A < 0 only below
1 - eps_low; where clipped the token's gradient is zero. The off-policy weight (token
and sequence importance sampling, IcePop and geometric masks: algo.tis_cap,
algo.offpolicy; offpolicy.py) is 1 when they are off and 0 on masked tokens, which stay
in the denominator.

Aggregation (`cfg.loss_agg`) and its denominator D (`loss_denominator`):

    token-mean           sum over all response tokens of tok / D,
                         D = number of response tokens in the WHOLE batch
    seq-mean-token-sum   sum over sequences of (sum of its tok) / D,
                         D = number of sequences (with >= 1 response token) in the batch
    seq-mean-token-mean  sum over sequences of (mean of its tok) / D, D as above

Pass the global D (summed over ranks and micro-batches, see `count_denominator`) and
the losses of all micro-batches on all ranks sum to exactly the whole-batch loss, so
gradients accumulate by plain summation. D=None uses this call's own count.
"""
from __future__ import annotations

from typing import Sequence

import torch

from srpo_ray.algo.masked import LOG_RATIO_LIMIT as _LOG_RATIO_LIMIT
from srpo_ray.algo.masked import masked_mean, masked_sum
from srpo_ray.algo.offpolicy import any_correction, correct, offpolicy_metrics, token_log_ratio, token_tis_weight
from srpo_ray.config.schema import AlgoConfig

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

# policy_loss's metrics that are counts, and (their last part) those that are means over
# sequences rather than tokens; see metric_count_key.
METRIC_COUNTS = ("num_tokens", "num_seqs")
_SEQUENCE_MEANS = ("masked_seq_frac", "seq_is_weight_mean")


def metric_count_key(name: str) -> str:
    """The count that policy_loss's metric `name` is a mean over, also among its metrics:
    the `num_tokens` beside it (`num_seqs` for per-sequence means such as
    `*_seq_frac`), i.e. `offpolicy/math/k3_kl` -> `offpolicy/math/num_tokens`, `entropy`
    -> `num_tokens`. Weighting each call's value by it combines calls (micro-batches,
    ranks) into exactly the whole batch's mean."""
    folder, _, last = name.rpartition("/")
    count = "num_seqs" if last in _SEQUENCE_MEANS else "num_tokens"
    return f"{folder}/{count}" if folder else count


def count_denominator(response_mask: torch.Tensor, loss_agg: str) -> float:
    """This batch's contribution to D: its response tokens (token-mean) or its sequences
    with at least one response token (seq-mean-*). Sum it over all micro-batches and
    ranks (e.g. all_reduce) and pass the total to every `policy_loss` call."""
    _check_agg(loss_agg)
    mask = response_mask.bool()
    if loss_agg == "token-mean":
        return float(mask.sum().item())
    return float(mask.any(dim=-1).sum().item())


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: AlgoConfig, *,
                loss_denominator: float | None = None,
                rollout_logprobs: torch.Tensor | None = None,
                ref_logprobs: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None,
                domains: Sequence[str] | None = None) -> tuple[torch.Tensor, dict]:
    """-> (scalar loss to backpropagate, metrics of floats). See the module docstring
    for the formula and the denominator.

    logprobs [B, T]: the learner's current log-probs of the response tokens (with grad).
    old_logprobs [B, T]: log-probs of the policy that the advantages belong to (the
      learner's, before this rollout batch's first update); no grad.
    rollout_logprobs [B, T]: the sampler's (vLLM's) log-probs; needed when cfg.tis_cap > 0
      or an algo.offpolicy correction is on. Then the pg term is weighted and masked by
      offpolicy.py (e.g. min(exp(old - rollout), tis_cap), detached), which corrects for
      sampling from vLLM rather than from the learner's policy.
    ref_logprobs [B, T]: reference policy log-probs; needed when cfg.kl_coef > 0
      (k3 estimator exp(ref - lp) - (ref - lp) - 1 per token).
    entropy [B, T]: per-token entropy (with grad); needed when cfg.entropy_coef > 0.
    domains [B]: each sequence's prompt domain, for per-domain offpolicy/<domain>/ metrics.

    metrics (this call's; average them across calls weighted by the count
    `metric_count_key` names, e.g. num_tokens; ratio maxima by max): pg_loss,
    clip_frac_low, clip_frac_high, approx_kl (k3 estimate of KL(old || new)), ratio_mean,
    ratio_max, num_tokens, num_seqs, and when given: kl_ref, entropy, and with
    rollout_logprobs logprob_mismatch (mean |old - rollout|), tis_weight_mean (tis_cap
    > 0) and offpolicy/... (offpolicy.offpolicy_metrics).
    """
    _check_agg(cfg.loss_agg)
    mask = _check_mask(response_mask, logprobs)
    _check_same_shape("old_logprobs", old_logprobs, logprobs)
    adv = _per_token_advantages(advantages, logprobs)
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)

    lp = logprobs.float()
    old = old_logprobs.detach().float()
    log_ratio = torch.where(mask, lp - old, zero).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)

    metrics: dict[str, float] = {}
    if rollout_logprobs is not None:
        _check_same_shape("rollout_logprobs", rollout_logprobs, logprobs)
        mismatch = (old - rollout_logprobs.detach().float()).abs()
        metrics["logprob_mismatch"] = masked_mean(mismatch, mask).item()
        log_w = token_log_ratio(old, rollout_logprobs, mask)
        correction = correct(log_w, mask, cfg)
        if correction.weight is not None:
            pg = pg * correction.weight
        if cfg.tis_cap > 0:
            metrics["tis_weight_mean"] = masked_mean(token_tis_weight(log_w, cfg.tis_cap), mask).item()
        metrics.update(offpolicy_metrics(log_w, mask, correction, domains))
    elif any_correction(cfg):
        raise ValueError("algo.tis_cap > 0 or an algo.offpolicy correction needs rollout_logprobs (the "
                         "sampler's log-probs); pass them or turn the corrections off (algo.tis_cap=0, "
                         "algo.offpolicy.seq_is=off, token_mask=false, geo_mask=false)")

    per_token = pg
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algo.kl_coef > 0 needs ref_logprobs (reference policy log-probs); "
                             "pass them or set algo.kl_coef=0")
        _check_same_shape("ref_logprobs", ref_logprobs, logprobs)
        d = torch.where(mask, ref_logprobs.detach().float() - lp, zero).clamp(-_LOG_RATIO_LIMIT,
                                                                               _LOG_RATIO_LIMIT)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl.detach(), mask).item()
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("algo.entropy_coef > 0 needs the per-token entropy [B, T]; "
                             "pass entropy=... or set algo.entropy_coef=0")
        _check_same_shape("entropy", entropy, logprobs)
        per_token = per_token - cfg.entropy_coef * entropy.float()
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach().float(), mask).item()

    loss = _aggregate(per_token, mask, cfg.loss_agg, loss_denominator)
    with torch.no_grad():
        ratio_d = ratio.detach()
        num_tokens = mask.sum()
        metrics.update({
            "pg_loss": _aggregate(pg.detach(), mask, cfg.loss_agg, loss_denominator).item(),
            "clip_frac_high": masked_mean(((adv > 0) & (ratio_d > 1 + cfg.eps_high)).float(), mask).item(),
            "clip_frac_low": masked_mean(((adv < 0) & (ratio_d < 1 - cfg.eps_low)).float(), mask).item(),
            "approx_kl": masked_mean(ratio_d - 1.0 - log_ratio.detach(), mask).item(),
            "ratio_mean": masked_mean(ratio_d, mask).item(),
            "ratio_max": torch.where(mask, ratio_d, zero).max().item() if num_tokens > 0 else 0.0,
            "num_tokens": float(num_tokens.item()),
            "num_seqs": float(mask.any(dim=-1).sum().item()),
        })
    return loss, metrics


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str,
               denominator: float | None) -> torch.Tensor:
    if denominator is not None and not denominator > 0:
        raise ValueError(f"loss_denominator must be > 0, got {denominator}; it is the global "
                         f"count of response tokens (or sequences) and a batch without any "
                         f"should be skipped")
    if loss_agg == "token-mean":
        total = masked_sum(per_token, mask)
    else:
        per_seq = masked_sum(per_token, mask, dim=-1)
        if loss_agg == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(dim=-1).clamp(min=1).to(per_seq.dtype)
        total = per_seq.sum()
    if denominator is None:
        # A call with nothing to learn from still returns a loss connected to the graph,
        # so a rank's backward pass (and FSDP's collectives) can run.
        denominator = max(count_denominator(mask, loss_agg), 1.0)
    return total / denominator


def _per_token_advantages(advantages: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    adv = advantages.detach().float()
    if adv.dim() == 1 and adv.shape[0] == logprobs.shape[0]:
        return adv[:, None]
    if adv.shape == logprobs.shape:
        return adv
    raise ValueError(f"advantages must be [B] or [B, T] matching logprobs {tuple(logprobs.shape)}, "
                     f"got {tuple(adv.shape)}")


def _check_mask(response_mask: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T] (sequences x response positions), "
                         f"got {tuple(logprobs.shape)}")
    _check_same_shape("response_mask", response_mask, logprobs)
    return response_mask.bool()


def _check_same_shape(name: str, x: torch.Tensor, logprobs: torch.Tensor) -> None:
    if x.shape != logprobs.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but logprobs has "
                         f"{tuple(logprobs.shape)}; both are [B, T] over the same response positions")


def _check_agg(loss_agg: str) -> None:
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"algo.loss_agg={loss_agg!r} is unknown; use one of {', '.join(LOSS_AGG_MODES)}")
