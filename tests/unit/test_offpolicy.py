"""Off-policy corrections (srpo_ray/algo/offpolicy.py) with values worked out by hand:
each correction alone, their order when combined, masked tokens keeping their place in
the loss denominator, the metrics (k3 by hand, per domain, combined over micro-batches
and a real in-process learner step), and the config checks."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from learner_cases import TEMPERATURE, free_port, learner_cfg, scored_batch

from srpo_ray.algo.loss import metric_count_key, policy_loss
from srpo_ray.algo.offpolicy import (
    correct,
    geometric_kept,
    offpolicy_metrics,
    sequence_is_kept,
    sequence_is_weight,
    token_log_ratio,
    token_mask_kept,
    token_tis_weight,
)
from srpo_ray.config.load import ConfigError, load_config
from srpo_ray.config.schema import AlgoConfig, OffPolicyConfig

LN2 = math.log(2.0)


def _cfg(tis_cap: float = 0.0, **offpolicy) -> AlgoConfig:
    return AlgoConfig(tis_cap=tis_cap, offpolicy=OffPolicyConfig(**offpolicy))


def _log_w(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ratios w per sequence -> (log w [B, T] padded with 0, response mask [B, T])."""
    width = max(len(r) for r in rows)
    log_w = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        log_w[b, :len(r)] = torch.log(torch.tensor(r))
        mask[b, :len(r)] = True
    return log_w, mask


def test_log_ratio_is_old_minus_rollout_and_padding_never_leaks():
    old = torch.tensor([[-1.0, -2.0, float("nan")]])
    rollout = torch.tensor([[-1.5, -1.0, float("inf")]])
    mask = torch.tensor([[True, True, False]])
    assert token_log_ratio(old, rollout, mask).tolist() == [[0.5, -1.0, 0.0]]


def test_token_tis_truncates_each_token():
    # w = 2 -> cap 1.5; w = 0.5 stays; exp never overflows: w = e^100 -> cap
    log_w = torch.tensor([[LN2, -LN2, 100.0]])
    assert torch.allclose(token_tis_weight(log_w, 1.5), torch.tensor([[1.5, 0.5, 1.5]]))


def test_sequence_is_truncate_weights_the_whole_sequence():
    # seq 0: w_seq = 2 * 2 * 0.5 = 2 -> min(2, 1.5) = 1.5; seq 1: 0.5 * 0.5 = 0.25 (its
    # padding position holds log w = 0 and would not count anyway)
    log_w, mask = _log_w([[2.0, 2.0, 0.5], [0.5, 0.5]])
    assert torch.allclose(sequence_is_weight(log_w, mask, 1.5), torch.tensor([1.5, 0.25]))
    # a long sequence's w_seq overflows float32 (e^(100 * 5)); the weight is the cap
    long_w = torch.full((1, 100), 5.0)
    assert sequence_is_weight(long_w, torch.ones(1, 100, dtype=torch.bool), 2.0).tolist() == [2.0]


def test_sequence_is_mask_drops_sequences_outside_the_bounds():
    # w_seq: 4 * 2 * 0.5 = 4 (> 2: dropped), 0.5 * 1.5 = 0.75 (kept), 0.25 * 1.5 = 0.375 (< 0.5: dropped)
    log_w, mask = _log_w([[4.0, 2.0, 0.5], [0.5, 1.5], [0.25, 1.5]])
    assert sequence_is_kept(log_w, mask, 0.5, 2.0).tolist() == [False, True, False]


def test_icepop_masks_single_tokens_outside_the_bounds():
    # [0.5, 2]: 3 and 0.25 and 0.4 out, 1 and 1.5 in
    log_w, _ = _log_w([[3.0, 1.0, 0.25], [1.5, 0.4, 1.0]])
    assert token_mask_kept(log_w, 0.5, 2.0).tolist() == [[False, True, False], [True, False, True]]


def test_geometric_mask_uses_the_mean_log_ratio_not_the_product():
    # [0.9, 1.1]: seq 0 geo = exp((ln 2 - ln 2) / 2) = 1 (kept, though its tokens are far
    # off); seq 1 geo = 1.2 (dropped); seq 2: ten tokens of 1.05, geo 1.05 (kept) while
    # w_seq = 1.05^10 = 1.63 would be dropped by seq_is=mask with the same bounds
    log_w, mask = _log_w([[2.0, 0.5], [1.2, 1.2], [1.05] * 10])
    assert geometric_kept(log_w, mask, 0.9, 1.1).tolist() == [True, False, True]
    assert sequence_is_kept(log_w, mask, 0.9, 1.1).tolist() == [True, False, False]


def _combined_case():
    """tis_cap 1.5, token_mask [0.5, 2], geo_mask [0.8, 1.5], seq_is truncate cap 2;
    lp = old (ratio 1, so pg = -A = -1 per token) and rollout = old - log w.

    seq 0, w = [4, 1.25, 0.6]: geo = 3^(1/3) = 1.442 (kept), w_seq = 3 -> 2; token 4 out.
        weights [0, 1.25 * 2, 0.6 * 2] = [0, 2.5, 1.2]. The statistics take every token:
        over the kept tokens alone w_seq would be 0.75 and geo 0.866.
    seq 1, w = [2, 2]: geo = 2 (dropped): [0, 0].
    seq 2, w = [1]: weight 1.
    token-mean over all 6 tokens (the masked 3 included): -(2.5 + 1.2 + 1) / 6."""
    log_w, mask = _log_w([[4.0, 1.25, 0.6], [2.0, 2.0], [1.0]])
    cfg = _cfg(tis_cap=1.5, token_mask=True, token_mask_low=0.5, token_mask_high=2.0, geo_mask=True,
               geo_mask_low=0.8, geo_mask_high=1.5, seq_is="truncate", seq_is_cap=2.0)
    return log_w, mask, cfg


def test_corrections_combine_in_the_documented_order():
    log_w, mask, cfg = _combined_case()
    c = correct(log_w, mask, cfg)
    assert torch.allclose(c.weight, torch.tensor([[0.0, 2.5, 1.2], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert c.token_dropped.tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    assert c.seq_dropped.tolist() == [False, True, False]
    assert torch.allclose(c.seq_weight, torch.tensor([2.0, 2.0, 1.0]))


def test_masked_tokens_get_no_gradient_and_stay_in_the_denominator():
    log_w, mask, cfg = _combined_case()
    lp = torch.zeros(3, 3, requires_grad=True)
    loss, m = policy_loss(lp, torch.zeros(3, 3), torch.ones(3), mask, cfg, rollout_logprobs=-log_w)
    assert loss.item() == pytest.approx(-(2.5 + 1.2 + 1.0) / 6, rel=1e-5)
    loss.backward()  # d(-ratio * A * weight)/dlp = -weight / 6 at ratio 1
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -2.5, -1.2], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]) / 6)
    assert m["offpolicy/masked_token_frac"] == pytest.approx(3 / 6)
    assert m["offpolicy/masked_seq_frac"] == pytest.approx(1 / 3)
    assert m["tis_weight_mean"] == pytest.approx((1.5 + 1.25 + 0.6 + 1.5 + 1.5 + 1.0) / 6, rel=1e-5)
    assert m["offpolicy/seq_is_weight_mean"] == pytest.approx(5 / 3, rel=1e-5)


def test_no_correction_leaves_the_loss_unchanged_and_corrections_need_rollout_logprobs():
    log_w, mask, _ = _combined_case()
    lp = torch.zeros(3, 3)
    plain, m = policy_loss(lp, lp, torch.ones(3), mask, _cfg(), rollout_logprobs=-log_w)
    assert plain.item() == pytest.approx(-1.0) and m["offpolicy/masked_token_frac"] == 0.0
    assert "tis_weight_mean" not in m and "offpolicy/seq_is_weight_mean" not in m
    for cfg in (_cfg(token_mask=True), _cfg(geo_mask=True), _cfg(seq_is="mask"), _cfg(tis_cap=2.0)):
        with pytest.raises(ValueError, match="rollout_logprobs"):
            policy_loss(lp, lp, torch.ones(3), mask, cfg)
    _, m = policy_loss(lp, lp, torch.ones(3), mask, _cfg())
    assert not any(k.startswith("offpolicy/") for k in m)  # nothing to compare against


def test_metrics_by_hand():
    # w = 2: k3 = 2 - 1 - ln 2 = 0.3069; w = 0.5: 0.5 - 1 + ln 2 = 0.1931; mean 0.25 exactly
    log_w, mask = _log_w([[2.0, 0.5]])
    m = offpolicy_metrics(log_w, mask, correct(log_w, mask, _cfg()))
    assert m["offpolicy/k3_kl"] == pytest.approx(0.25, rel=1e-5)
    assert m["offpolicy/ratio_mean"] == pytest.approx(1.25, rel=1e-5)
    assert m["offpolicy/ratio_max"] == pytest.approx(2.0, rel=1e-5)
    assert m["offpolicy/masked_token_frac"] == 0.0 and m["offpolicy/masked_seq_frac"] == 0.0
    assert m["offpolicy/num_tokens"] == 2 and m["offpolicy/num_seqs"] == 1
    # a huge gap stays finite (the log-ratio is clamped at 20 as in the loss)
    m = offpolicy_metrics(torch.tensor([[500.0]]), torch.ones(1, 1, dtype=torch.bool),
                          correct(torch.tensor([[500.0]]), torch.ones(1, 1, dtype=torch.bool), _cfg()))
    assert m["offpolicy/k3_kl"] == pytest.approx(math.exp(20) - 21, rel=1e-5)


K3_1_5 = 1.5 - 1 - math.log(1.5)  # 0.0945
K3_2, K3_HALF = 1 - LN2, LN2 - 0.5  # 0.3069, 0.1931


def _domain_case():
    """math A w = [2, 0.5] (w_seq 1), math B w = [1.5] (w_seq 1.5), code C w = [1, 1];
    seq_is=mask [0.5, 1.25] drops B only."""
    log_w, mask = _log_w([[2.0, 0.5], [1.5], [1.0, 1.0]])
    return log_w, mask, _cfg(seq_is="mask", seq_is_low=0.5, seq_is_high=1.25), ["math", "math", "code"]


def test_per_domain_metrics_by_hand():
    log_w, mask, cfg, domains = _domain_case()
    m = offpolicy_metrics(log_w, mask, correct(log_w, mask, cfg), domains)
    assert m["offpolicy/math/k3_kl"] == pytest.approx((K3_2 + K3_HALF + K3_1_5) / 3, rel=1e-5)
    assert m["offpolicy/math/masked_token_frac"] == pytest.approx(1 / 3)
    assert m["offpolicy/math/masked_seq_frac"] == pytest.approx(1 / 2)
    assert m["offpolicy/math/ratio_mean"] == pytest.approx((2 + 0.5 + 1.5) / 3, rel=1e-5)
    assert (m["offpolicy/code/k3_kl"], m["offpolicy/code/masked_token_frac"], m["offpolicy/code/masked_seq_frac"]) \
        == (0.0, 0.0, 0.0)
    assert m["offpolicy/k3_kl"] == pytest.approx((K3_2 + K3_HALF + K3_1_5) / 5, rel=1e-5)
    assert m["offpolicy/masked_token_frac"] == pytest.approx(1 / 5)
    assert m["offpolicy/masked_seq_frac"] == pytest.approx(1 / 3)
    assert "offpolicy/math/ratio_max" not in m
    with pytest.raises(ValueError, match="one prompt domain per sequence"):
        offpolicy_metrics(log_w, mask, correct(log_w, mask, cfg), ["math"])


def test_micro_batch_metrics_combine_into_the_whole_batch_by_their_counts():
    """Calls weighted by the count metric_count_key names (tokens; sequences for the
    *_seq_frac ones; the domain's own) give the one-call value, as the learner combines
    them (srpo_ray/learner/core.py _accumulate)."""
    log_w, mask, cfg, domains = _domain_case()
    whole = offpolicy_metrics(log_w, mask, correct(log_w, mask, cfg), domains)
    parts = [offpolicy_metrics(log_w[s], mask[s], correct(log_w[s], mask[s], cfg), domains[s])
             for s in (slice(0, 1), slice(1, 3))]
    assert metric_count_key("offpolicy/math/masked_seq_frac") == "offpolicy/math/num_seqs"
    assert metric_count_key("entropy") == "num_tokens"
    for name, value in whole.items():
        if name.rpartition("/")[2] in ("num_tokens", "num_seqs", "ratio_max"):
            continue
        key = metric_count_key(name)
        total = sum(p[name] * p[key] for p in parts if name in p)
        count = sum(p[key] for p in parts if name in p)
        assert total / count == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_learner_step_reports_offpolicy_metrics_per_domain(tiny_tied_model_dir, monkeypatch):
    """A real one-rank FSDP2 step over four micro-batches. The sampler's log-probs are
    the model's own shifted by known amounts d, so w = exp(d) up to float32 rounding:
    seq 0 (math) d = 1 on 4 tokens: geo e, dropped by geo_mask [0.5, 2];
    seq 1 (code) d = [0.1, -2, 0.1]: token -2 dropped by token_mask [0.5, 2];
    seq 2 (math) d = 0 on 5 tokens; seq 3 (code) d = 0.3 on 2 tokens."""
    import torch.distributed as dist

    from srpo_ray.learner.core import FSDPLearner

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = learner_cfg(micro_batch_size=1)
    cfg.algo.offpolicy = OffPolicyConfig(token_mask=True, geo_mask=True, geo_mask_low=0.5, geo_mask_high=2.0)
    batch = scored_batch(tiny_tied_model_dir, [4, 3, 5, 2], [1.0, -1.0, 1.0, -1.0], seed=3)
    shift = torch.zeros_like(batch.rollout_logprobs)
    for b, d in enumerate([[1.0] * 4, [0.1, -2.0, 0.1], [0.0] * 5, [0.3, 0.3]]):
        shift[b, batch.response_mask[b].bool()] = torch.tensor(d)
    batch = replace(batch, rollout_logprobs=batch.rollout_logprobs - shift, domains=("math", "code", "math", "code"))
    learner = FSDPLearner(tiny_tied_model_dir, cfg, rank=0, world_size=1)
    try:
        learner.setup()
        m = learner.train_step(batch, float(batch.num_response_tokens), TEMPERATURE)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    k3 = lambda d: math.exp(d) - 1 - d  # noqa: E731
    assert m["learner/offpolicy/math/k3_kl"] == pytest.approx(4 * k3(1.0) / 9, rel=1e-3)
    assert m["learner/offpolicy/code/k3_kl"] == pytest.approx((2 * k3(0.1) + k3(-2.0) + 2 * k3(0.3)) / 5, rel=1e-3)
    assert m["learner/offpolicy/math/masked_token_frac"] == pytest.approx(4 / 9)
    assert m["learner/offpolicy/math/masked_seq_frac"] == pytest.approx(1 / 2)
    assert m["learner/offpolicy/code/masked_token_frac"] == pytest.approx(1 / 5)
    assert m["learner/offpolicy/code/masked_seq_frac"] == 0.0
    assert m["learner/offpolicy/masked_token_frac"] == pytest.approx(5 / 14)
    assert m["learner/offpolicy/masked_seq_frac"] == pytest.approx(1 / 4)
    assert m["learner/offpolicy/ratio_max"] == pytest.approx(math.e, rel=1e-3)
    assert not any(k.rpartition("/")[2] in ("num_tokens", "num_seqs") for k in m)


@pytest.mark.parametrize("override, message", [
    ("algo.offpolicy.seq_is=clip", r"algo\.offpolicy\.seq_is: 'clip' is unknown; use one of off, truncate, mask"),
    ("algo.offpolicy.seq_is_cap=0", r"algo\.offpolicy\.seq_is_cap: 0.*must be > 0"),
    ("algo.offpolicy.token_mask_low=2.0", r"algo\.offpolicy\.token_mask_low: .*need 0 < low < high"),
    ("algo.offpolicy.geo_mask_high=0.5", r"algo\.offpolicy\.geo_mask_low: .*need 0 < low < high"),
    ("algo.offpolicy.seq_is_low=0", r"algo\.offpolicy\.seq_is_low: .*need 0 < low < high"),
    ("algo.tis_cap=-1", r"algo\.tis_cap: must be >= 0"),
    ("algo.offpolicy.token_masc=true", r"algo\.offpolicy\.token_masc"),
])
def test_bad_offpolicy_config_names_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_offpolicy_config_loads_from_overrides():
    cfg = load_config(None, ["algo.offpolicy.seq_is=mask", "algo.offpolicy.geo_mask=true", "algo.tis_cap=2"])
    assert cfg.algo.offpolicy.seq_is == "mask" and cfg.algo.offpolicy.geo_mask and cfg.algo.tis_cap == 2.0
    assert load_config(None).algo.offpolicy == OffPolicyConfig()  # all off by default
