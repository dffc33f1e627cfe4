"""Paired bootstrap and mean/std."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.stats import mean_std, paired_bootstrap

KEYS = {"mean_before", "mean_after", "mean_diff", "ci_low", "ci_high"}


def test_constant_shift_gives_a_degenerate_interval():
    before = np.random.default_rng(0).normal(size=50)
    out = paired_bootstrap(before, before + 0.5)
    assert set(out) == KEYS and all(type(v) is float for v in out.values())
    assert out["mean_diff"] == pytest.approx(0.5, abs=1e-12)
    assert out["ci_low"] == pytest.approx(0.5, abs=1e-12)
    assert out["ci_high"] == pytest.approx(0.5, abs=1e-12)
    assert out["mean_after"] - out["mean_before"] == pytest.approx(0.5, abs=1e-12)


def test_known_small_sample():
    out = paired_bootstrap([1, 2, 3, 4], [2, 2, 5, 4], n_resamples=2000)
    assert out["mean_before"] == 2.5
    assert out["mean_after"] == 3.25
    assert out["mean_diff"] == 0.75
    # Diffs are [1, 0, 2, 0]: every resampled mean is a multiple of 1/4 in [0, 2].
    assert 0.0 <= out["ci_low"] <= 0.75 <= out["ci_high"] <= 2.0
    assert (out["ci_low"] * 4) % 1 == 0 and (out["ci_high"] * 4) % 1 == 0


def test_two_item_interval_endpoints():
    # Diffs [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are exactly the extremes.
    out = paired_bootstrap([0.0, 0.0], [0.0, 1.0], n_resamples=4000, seed=1)
    assert (out["ci_low"], out["mean_diff"], out["ci_high"]) == (0.0, 0.5, 1.0)


def test_symmetric_noise_interval_contains_zero():
    e = np.random.default_rng(1).normal(size=100)
    before = np.random.default_rng(2).normal(size=200)
    out = paired_bootstrap(before, before + np.concatenate([e, -e]))
    assert out["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert out["ci_low"] < 0.0 < out["ci_high"]


def test_interval_width_matches_normal_theory():
    diff = np.random.default_rng(3).normal(size=400)
    diff = (diff - diff.mean()) / diff.std()  # sample mean 0, sd 1 exactly
    out = paired_bootstrap(np.zeros(400), diff, n_resamples=10000, seed=0)
    half_width = 1.959964 / math.sqrt(400)
    assert out["ci_high"] == pytest.approx(half_width, rel=0.06)
    assert out["ci_low"] == pytest.approx(-half_width, rel=0.06)


def test_seeded_and_nested_by_confidence():
    rng = np.random.default_rng(4)
    before, after = rng.normal(size=60), rng.normal(0.3, 1.0, size=60)
    a = paired_bootstrap(before, after, seed=5)
    assert a == paired_bootstrap(list(before), list(after), seed=5)
    assert a != paired_bootstrap(before, after, seed=6)
    wide = paired_bootstrap(before, after, confidence=0.99, seed=5)
    assert wide["ci_low"] < a["ci_low"] <= a["mean_diff"] <= a["ci_high"] < wide["ci_high"]


def test_chunked_resampling_matches_shape_of_result():
    # Enough items that resampling runs in several chunks; the answer is still a plain interval.
    before = np.zeros(5000)
    after = np.random.default_rng(9).normal(size=5000)
    out = paired_bootstrap(before, after, n_resamples=1200, seed=0)
    assert out["ci_low"] < out["mean_diff"] < out["ci_high"]
    assert out == paired_bootstrap(before, after, n_resamples=1200, seed=0)


def test_errors():
    with pytest.raises(ValueError, match=r"before has 3 values and after has 2"):
        paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"are empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match=r"confidence=1.0"):
        paired_bootstrap([1.0], [2.0], confidence=1.0)
    with pytest.raises(ValueError, match=r"n_resamples=0"):
        paired_bootstrap([1.0], [2.0], n_resamples=0)
    with pytest.raises(ValueError, match=r"^after: value nan at index 1 is not finite"):
        paired_bootstrap([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"^before: expected a flat list"):
        paired_bootstrap([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^before: expected a list of numbers"):
        paired_bootstrap(["a"], [1.0])


def test_mean_std():
    assert mean_std([1, 2, 3, 4]) == (2.5, pytest.approx(math.sqrt(1.25), abs=1e-15))
    assert mean_std([1, 2, 3, 4], ddof=1) == (2.5, pytest.approx(math.sqrt(5 / 3), abs=1e-15))
    assert mean_std([7.0]) == (7.0, 0.0)
    m, s = mean_std(np.array([0.5, 0.5]))
    assert type(m) is float and type(s) is float
    with pytest.raises(ValueError, match=r"^mean_std: xs has 0 values"):
        mean_std([])
    with pytest.raises(ValueError, match=r"at least 2 are needed for ddof=1"):
        mean_std([1.0], ddof=1)
