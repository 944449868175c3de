"""The clipped policy loss: hand-computed values per aggregation mode, clipping sides and
their zero gradients, micro-batch sums equal to the full batch, KL, entropy and TIS."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from srpo_ray.algo.loss import count_denominator, masked_mean, masked_sum, policy_loss
from srpo_ray.config.schema import AlgoConfig

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


def _cfg(**kw) -> AlgoConfig:
    return AlgoConfig(**{"eps_low": 0.2, "eps_high": 0.28, **kw})


def _hand_batch():
    """Two sequences; old log-probs 0 so ratio = exp(logprobs). The padded position holds
    a wild value that must not leak into anything."""
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 0.7]])
    logprobs = ratios.log()
    logprobs[0, 2] = 80.0  # padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    return logprobs, torch.zeros(2, 3), adv, mask


# Per token, -min(r*A, clip(r, 0.8, 1.28)*A):
#   seq 0 (A=+1): r=1.5 -> clipped -1.28; r=0.9 -> -0.9            sum -2.18
#   seq 1 (A=-2): r=0.5 -> 1.6 (clipped); r=1.1 -> 2.2; r=0.7 -> 1.6 (clipped)   sum 5.4
HAND = {"token-mean": (-2.18 + 5.4) / 5, "seq-mean-token-sum": (-2.18 + 5.4) / 2,
        "seq-mean-token-mean": (-2.18 / 2 + 5.4 / 3) / 2}


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed_value_per_mode(mode):
    logprobs, old, adv, mask = _hand_batch()
    loss, m = policy_loss(logprobs, old, adv, mask, _cfg(loss_agg=mode))
    assert loss.item() == pytest.approx(HAND[mode], rel=1e-5)
    assert m["pg_loss"] == pytest.approx(HAND[mode], rel=1e-5)
    assert m["clip_frac_high"] == pytest.approx(1 / 5)  # r=1.5 with A>0
    assert m["clip_frac_low"] == pytest.approx(2 / 5)  # r=0.5 and r=0.7 with A<0
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5 + 1.1 + 0.7) / 5, rel=1e-5)
    assert m["num_tokens"] == 5
    assert math.isfinite(m["ratio_max"]) and m["ratio_max"] == pytest.approx(1.5)


@pytest.mark.parametrize("mode", MODES)
def test_explicit_denominator_scales(mode):
    logprobs, old, adv, mask = _hand_batch()
    loss, _ = policy_loss(logprobs, old, adv, mask, _cfg(loss_agg=mode), loss_denominator=10.0)
    own = count_denominator(mask, mode)
    assert own == (5.0 if mode == "token-mean" else 2.0)
    assert loss.item() == pytest.approx(HAND[mode] * own / 10.0, rel=1e-5)


def _token_grad(ratio: float, adv: float, cfg: AlgoConfig) -> tuple[float, float]:
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool), cfg)
    loss.backward()
    return loss.item(), lp.grad.item()


@settings(max_examples=150, deadline=None)
@given(ratio=st.floats(0.05, 5.0), adv=st.floats(0.01, 10.0), positive=st.booleans())
def test_clipping_bites_only_on_the_documented_side(ratio, adv, positive):
    cfg = _cfg()
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    assume(min(abs(ratio - lo), abs(ratio - hi)) > 1e-4)  # at the boundary min() splits the gradient
    a = adv if positive else -adv
    loss, grad = _token_grad(ratio, a, cfg)
    clipped = ratio > hi if positive else ratio < lo
    if clipped:
        assert grad == 0.0
        assert loss == pytest.approx(-(hi if positive else lo) * a, rel=1e-5)
    else:  # plain surrogate -ratio*A, d/dlogp = -ratio*A
        assert loss == pytest.approx(-ratio * a, rel=1e-5)
        assert grad == pytest.approx(-ratio * a, rel=1e-4)


def _random_batch(seed: int, b: int, t: int, adv_per_token: bool):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(b, t, generator=g) * 3).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g) if adv_per_token else torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] |= torch.rand(b, generator=g) < 0.8  # some rows may be all padding
    return logprobs, old, adv, mask


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 9), t=st.integers(1, 7), mode=st.sampled_from(MODES),
       cuts=st.lists(st.integers(1, 8), max_size=4), adv_per_token=st.booleans())
def test_microbatch_sum_with_global_denominator_equals_full_batch(seed, b, t, mode, cuts, adv_per_token):
    logprobs, old, adv, mask = _random_batch(seed, b, t, adv_per_token)
    assume(mask.any())
    cfg = _cfg(loss_agg=mode)
    full, _ = policy_loss(logprobs, old, adv, mask, cfg)
    (full_grad,) = torch.autograd.grad(full, logprobs)

    bounds = sorted({0, b, *[c for c in cuts if c < b]})  # micro-batches (as if on several ranks)
    denom = sum(count_denominator(mask[s:e], mode) for s, e in zip(bounds, bounds[1:]))
    total = sum(policy_loss(logprobs[s:e], old[s:e], adv[s:e], mask[s:e], cfg, loss_denominator=denom)[0]
                for s, e in zip(bounds, bounds[1:]))
    (split_grad,) = torch.autograd.grad(total, logprobs)
    assert total.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(split_grad, full_grad, rtol=1e-5, atol=1e-7)


def test_masked_positions_get_no_gradient_even_with_wild_values():
    logprobs, old, adv, mask = _hand_batch()
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, adv, mask, _cfg())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0.0


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    lp = torch.zeros(2, 2, requires_grad=True)
    loss, m = policy_loss(lp, torch.zeros(2, 2), torch.tensor([1.0, -3.0]), torch.ones(2, 2, dtype=torch.bool), _cfg())
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.25], [0.75, 0.75]]))
    assert m["approx_kl"] == 0.0 and m["clip_frac_low"] == 0.0 and m["clip_frac_high"] == 0.0


def test_kl_to_reference_uses_k3():
    lp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = _cfg(kl_coef=0.1)
    loss, m = policy_loss(lp, lp.detach(), torch.tensor([0.0]), mask, cfg, ref_logprobs=ref)
    k3 = math.exp(-0.5) + 0.5 - 1.0  # exp(ref-lp) - (ref-lp) - 1 at token 0; 0 at token 1
    assert m["kl_ref"] == pytest.approx(k3 / 2, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * k3 / 2, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp.detach(), torch.tensor([0.0]), mask, cfg)


def test_entropy_bonus_lowers_the_loss():
    lp = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    ent = torch.tensor([[2.0, 4.0, 100.0]])
    loss, m = policy_loss(lp, lp, torch.tensor([0.0]), mask, _cfg(entropy_coef=0.01), entropy=ent)
    assert loss.item() == pytest.approx(-0.01 * 3.0)
    assert m["entropy"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, lp, torch.tensor([0.0]), mask, _cfg(entropy_coef=0.01))


def test_truncated_importance_sampling_weights_and_mismatch_metric():
    lp = torch.zeros(1, 2, requires_grad=True)
    rollout = torch.tensor([[math.log(0.5), math.log(2.0)]])  # weights exp(0 - rollout): 2 -> cap 1.5, 0.5
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), mask, _cfg(tis_cap=1.5),
                          rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-(1.5 + 0.5) / 2, rel=1e-5)
    assert m["tis_weight_mean"] == pytest.approx(1.0, rel=1e-5)
    assert m["logprob_mismatch"] == pytest.approx(math.log(2.0), rel=1e-5)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.75, -0.25]]))  # the weight is detached
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), mask, _cfg(tis_cap=1.5))
    _, m = policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), mask, _cfg(), rollout_logprobs=rollout)
    assert "tis_weight_mean" not in m and m["logprob_mismatch"] == pytest.approx(math.log(2.0), rel=1e-5)


def test_empty_mask_gives_zero_loss_that_still_backpropagates():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, m = policy_loss(lp, lp.detach(), torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), _cfg())
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3)) and m["num_tokens"] == 0


def test_masked_helpers():
    x = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert masked_sum(x, mask).item() == 9.0
    assert masked_mean(x, mask).item() == 3.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.0, 4.0]
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_bad_inputs_raise_with_names():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, torch.zeros(2, 2), torch.ones(2), mask, _cfg())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, lp, torch.ones(3), mask, _cfg())
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(lp, lp, torch.ones(2), mask, _cfg(loss_agg="sum"))
    with pytest.raises(ValueError, match="loss_denominator"):
        policy_loss(lp, lp, torch.ones(2), mask, _cfg(), loss_denominator=0)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, lp, torch.ones(2), torch.ones(2, 2), _cfg())
