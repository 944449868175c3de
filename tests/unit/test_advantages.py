"""Group-relative advantages: hand-computed values, exact zeros for constant groups."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_ray.algo.advantages import group_advantages, zero_variance_mask


def test_hand_computed_values_normalized_and_not():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    adv, metrics = group_advantages(rewards, normalize_by_std=False)
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]]))

    adv, metrics = group_advantages(rewards, normalize_by_std=True, eps=1e-6)
    std0 = math.sqrt((4 * 0.25) / 3)  # unbiased: divides by n - 1
    std2 = math.sqrt((2.25**2 + 3 * 0.75**2) / 3)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]])
    expected[0] /= std0 + 1e-6
    expected[2] /= std2 + 1e-6
    assert torch.allclose(adv, expected, atol=1e-6)
    assert metrics["zero_variance_frac"] == pytest.approx(1 / 3)
    assert metrics["reward_mean"] == pytest.approx(rewards.mean().item())
    assert metrics["num_groups"] == 3


@settings(max_examples=60, deadline=None)
@given(value=st.floats(-1e3, 1e3, allow_nan=False), n=st.integers(1, 16), normalize=st.booleans())
def test_constant_group_gets_exactly_zero(value, n, normalize):
    rewards = torch.full((3, n), value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n == 1 must not trip torch.std's degrees-of-freedom warning
        adv, metrics = group_advantages(rewards, normalize_by_std=normalize)
    assert torch.equal(adv, torch.zeros_like(rewards))
    assert metrics["zero_variance_frac"] == 1.0


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=4, max_size=4), min_size=1, max_size=8))
def test_nonconstant_groups_are_centered_and_unit_std(rows):
    rewards = torch.tensor(rows)
    adv, _ = group_advantages(rewards, normalize_by_std=True, eps=1e-9)
    mask = zero_variance_mask(rewards)
    assert torch.equal(mask, torch.tensor([len(set(r)) == 1 for r in rows]))
    for g in range(len(rows)):
        assert adv[g].sum().item() == pytest.approx(0.0, abs=1e-5)
        if not mask[g]:
            assert adv[g].std().item() == pytest.approx(1.0, abs=1e-4)
            # better-than-average samples get positive advantage
            assert torch.equal(adv[g] > 0, rewards[g] > rewards[g].mean())


def test_integer_rewards_and_no_grad():
    adv, _ = group_advantages(torch.tensor([[1, 0]]), normalize_by_std=False)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    assert adv.tolist() == [[0.5, -0.5]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-D"):
        group_advantages(torch.zeros(4), normalize_by_std=True)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), normalize_by_std=True)
