"""The statistics bench/reward_study.py reports: whether two PPO implementations reach the same reward
is read off these intervals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import difference, mean_se  # noqa: E402
from reward_study import parse_arm  # noqa: E402


def test_mean_and_standard_error_golden():
    # mean 2; sample variance ((1)^2 + 0 + (1)^2) / 2 = 1; standard error 1 / sqrt(3)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3), abs=1e-12)


def test_difference_has_a_welch_95_percent_interval():
    # means 2 and 1; standard errors 1/sqrt(3) and sqrt(2)/sqrt(2) = 1 -> s.e. of the difference sqrt(1/3 + 1)
    d, lo, hi = difference([1.0, 2.0, 3.0], [0.0, 2.0])
    se = math.sqrt(1 / 3 + 1)
    assert d == 1.0
    assert (lo, hi) == pytest.approx((1 - 1.96 * se, 1 + 1.96 * se), abs=1e-12)


def test_arm_names_and_overrides():
    assert parse_arm("trl") == ("trl", [])
    assert parse_arm("at_eos:stages.ppo.score_after_eos=false stages.ppo.lam=1") == (
        "at_eos", ["stages.ppo.score_after_eos=false", "stages.ppo.lam=1"])
