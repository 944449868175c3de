"""The two-sample KS test bench/bench_async_cpu.py reports (no scipy in the venv)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_async_cpu import ks_two_sample  # noqa: E402


def test_identical_samples_do_not_differ() -> None:
    assert ks_two_sample([3, 1, 2, 2], [2, 3, 1, 2]) == (0.0, 1.0)


def test_shifted_samples_match_the_tabled_value() -> None:
    # 0..99 vs 20..119: D = 0.2; Numerical Recipes' probks with Stephens' correction
    # at ne = 50: lambda = (sqrt(50) + 0.12 + 0.11 / sqrt(50)) * 0.2 = 1.4228 -> p = 0.0314
    d, p = ks_two_sample(list(range(100)), list(range(20, 120)))
    assert d == pytest.approx(0.2) and p == pytest.approx(0.0314, abs=5e-4)


def test_same_distribution_passes_and_a_biased_one_fails() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(4, 1, 2000).astype(int)
    assert ks_two_sample(list(lengths[:1000]), list(lengths[1000:]))[1] > 0.05
    # the discard policy's bias: the longest 20% of one sample never trains
    kept = np.sort(lengths[1000:])[:800]
    assert ks_two_sample(list(lengths[:1000]), list(kept))[1] < 0.05
