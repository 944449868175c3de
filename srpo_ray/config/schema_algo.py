"""The configuration schema's algo section (loss, clipping, dynamic sampling,
off-policy corrections); re-exported by srpo_ray/config/schema.py, which holds the rest.

Values the SRPO paper does not publish are marked "(our choice)".
"""
from __future__ import annotations

from dataclasses import dataclass, field

OFFPOLICY_SEQ_IS_MODES = ("off", "truncate", "mask")  # algo.offpolicy.seq_is


@dataclass
class OffPolicyConfig:
    """algo.offpolicy: corrections for training on tokens the learner's policy did not
    sample (srpo_ray/algo/offpolicy.py). All off by default; they combine freely.

    Per response token t, w_t = exp(old_t - rollout_t): the probability of the sampled
    token under the policy the advantages belong to (the learner's "old" log-probs), over
    its probability under the sampler that drew it (vLLM's log-probs). They differ by
    numerics (bf16, kernels), by stale weights (rollout.steps_ahead) and by truncation:
    vLLM samples from softmax(logits / T) cut to the top-p nucleus and renormalised, and
    reports exactly that log-prob (logprobs_mode=processed_logprobs), while the learner's
    are the full softmax at T. So with top_p < 1, w_t is the importance weight of the full
    policy against the truncated sampler, at most the nucleus mass even with identical
    weights; set lower bounds with that in mind.

    Order: every statistic comes from the raw ratios of all the sequence's response
    tokens (so no correction sees another's output), the masks then intersect (a token
    keeps its policy gradient only if no mask drops it or its sequence), and on the kept
    tokens the weights multiply: pg_t x min(w_t, algo.tis_cap) x min(w_seq, seq_is_cap).
    A masked token stays in the loss denominator and contributes 0, as in IcePop, so
    masking does not scale up the other tokens' gradients. Only the policy-gradient term
    is weighted or masked (not algo.kl_coef's or algo.entropy_coef's). Every weight is
    detached (no gradient through it), float32, from log-ratios clamped before exp.

    Metrics (learner/offpolicy/..., per step, whether or not a correction is on):
    k3_kl (k3 estimate of KL(sampler || learner-old) per token: w - 1 - log w),
    ratio_mean, ratio_max (of w_t), masked_token_frac, masked_seq_frac (dropped by a
    sequence mask), and per prompt domain offpolicy/<domain>/k3_kl, ratio_mean,
    masked_token_frac, masked_seq_frac."""

    seq_is: str = "off"
    """Sequence-level importance sampling with w_seq = exp(sum_t log w_t) over the
    sequence's response tokens: off; truncate (every token of the sequence weighted by
    min(w_seq, seq_is_cap)); mask (sequences with w_seq outside [seq_is_low,
    seq_is_high] get no policy gradient). w_seq compounds over long responses: prefer
    geo_mask there."""
    seq_is_cap: float = 2.0
    """seq_is=truncate: the cap on w_seq (our choice)."""
    seq_is_low: float = 0.5
    """seq_is=mask: the lowest w_seq kept (our choice)."""
    seq_is_high: float = 2.0
    """seq_is=mask: the highest w_seq kept (our choice)."""
    token_mask: bool = False
    """IcePop-style token masking: tokens with w_t outside [token_mask_low,
    token_mask_high] get no policy gradient (their sequence keeps the others')."""
    token_mask_low: float = 0.5
    """token_mask: the lowest w_t kept (IcePop's 0.5)."""
    token_mask_high: float = 2.0
    """token_mask: the highest w_t kept (IcePop's 2)."""
    geo_mask: bool = False
    """Geometric-mean sequence masking: sequences whose geometric-mean token ratio
    exp(mean_t log w_t) lies outside [geo_mask_low, geo_mask_high] get no policy
    gradient. Unlike w_seq it does not grow with the length."""
    geo_mask_low: float = 0.99
    """geo_mask: the lowest geometric-mean ratio kept (our choice)."""
    geo_mask_high: float = 1.01
    """geo_mask: the highest geometric-mean ratio kept (our choice)."""


@dataclass
class AlgoConfig:
    eps_low: float = 0.2
    """Lower clip: ratio is clipped below 1 - eps_low (our choice, as DAPO)."""
    eps_high: float = 0.28
    """Upper clip: ratio is clipped above 1 + eps_high (our choice, as DAPO)."""
    loss_agg: str = "token-mean"
    """token-mean (SRPO: sum over all response tokens of the batch / their count),
    seq-mean-token-sum, or seq-mean-token-mean."""
    normalize_adv_by_std: bool = True
    """Divide group-relative advantages by the group's reward std (GRPO)."""
    kl_coef: float = 0.0
    """KL penalty to the initial policy (0 = off, as in SRPO). > 0 keeps a frozen copy
    of model.path on every learner rank (sharded like the policy, no optimizer) and adds
    kl_coef * k3(ref || policy) per token to the loss."""
    entropy_coef: float = 0.0
    minibatches: int = 1
    """Optimizer steps per rollout batch; >1 makes the old-policy log-probs matter."""
    tis_cap: float = 0.0
    """Token-level truncated importance sampling between learner and vLLM log-probs:
    each token's policy gradient weighted by min(w_t, tis_cap), w_t as in algo.offpolicy
    (0 = off). Combines with the corrections of algo.offpolicy."""
    overlong: str = "truncate"
    """What to do with responses cut at max_new_tokens: truncate (score as is),
    filter (no gradient), or penalty (soft length penalty)."""
    dynamic_sampling: bool = False
    """DAPO-style dynamic sampling (a baseline to compare with History Resampling; off
    in SRPO): a step drops groups whose rewards are all equal and draws more prompts
    from the ledger until it has prompts_per_step groups with reward variance or
    dynamic_sampling_max_rounds rounds ran. Dropped groups are still recorded in the ledger."""
    dynamic_sampling_max_rounds: int = 4
    """Most rounds of generate + score per step with dynamic_sampling (our choice)."""
    offpolicy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    """Off-policy corrections beyond tis_cap: sequence-level importance sampling,
    IcePop token masking, geometric-mean sequence masking (see OffPolicyConfig)."""
