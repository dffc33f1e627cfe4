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


def test_a_partial_benchmark_run_keeps_the_sections_it_did_not_redo():
    from run import DEV_NOTES, kept_sections

    old = ("# Benchmarks\n\nWritten by `bench/run.py --only ppo sft` (what `make bench` runs) on day 2, commit abc123. "
           "Raw numbers: ...\n\n## Machine and versions\n\n- old machine\n\n## Pipeline\n\n(Measured on day 1.)\n\n"
           "| from empty | 869 s |\n\n## PPO: ours vs TRL\n\n1.86x\n\n## SFT: ours\n\n0.81x\n\n"
           f"{DEV_NOTES}\n\nnotes\n")
    new = "# Benchmarks\n\n## Machine and versions\n\n- new machine\n\n## SFT: ours\n\n1.89x\n"
    kept = kept_sections(old, new)
    # the pipeline and PPO sections come back whole, in their order, PPO with the date of the run that
    # wrote the old file (it had none of its own); the redone SFT section and the machine are the new
    # run's; the development notes are not a section to keep
    assert kept == ("\n## Pipeline\n\n(Measured on day 1.)\n\n| from empty | 869 s |\n"
                    "\n## PPO: ours vs TRL\n\n(Measured on day 2 by `bench/run.py --only ppo sft`, commit abc123.)\n"
                    "\n1.86x\n")
    assert kept_sections(new, new) == "" and DEV_NOTES not in kept
