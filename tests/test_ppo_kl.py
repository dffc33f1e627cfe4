"""Golden tests for the KL-coefficient controllers in rlhf.ppo.kl.

The adaptive controller's expected values are derived by hand from its update rule,
value *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon, the arithmetic next to each case;
the other tests check that a state dict round-trips and that bad arguments are refused.
"""

from __future__ import annotations

import pytest

from rlhf.ppo.kl import AdaptiveKLController, FixedKLController


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize(
    "current_kl,expected",
    [
        # target 6, horizon 10000, n_steps 256, value 0.2; value *= 1 + clip(kl/6 - 1, -0.2, 0.2) * 256 / 10000
        (6.6, 0.2 * (1 + 0.1 * 0.0256)),  # error 6.6/6 - 1 = 0.1 -> 0.2 * 1.00256 = 0.200512
        (5.4, 0.2 * (1 - 0.1 * 0.0256)),  # error -0.1 -> 0.2 * 0.99744 = 0.199488
        (12.0, 0.2 * (1 + 0.2 * 0.0256)),  # error 1.0 clipped to 0.2 -> 0.2 * 1.00512 = 0.201024
        (0.0, 0.2 * (1 - 0.2 * 0.0256)),  # error -1.0 clipped to -0.2 -> 0.2 * 0.99488 = 0.198976
        (6.0, 0.2),  # on target: unchanged
    ],
)
def test_adaptive_kl_controller_update(current_kl, expected):
    ctl = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=current_kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, abs=1e-12)


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    for kl in (9.0, 7.5, 2.0):
        ctl.update(kl, n_steps=512)
    resumed = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.2
    # Both continue identically after the resume.
    ctl.update(8.0, n_steps=512)
    resumed.update(8.0, n_steps=512)
    assert resumed.value == ctl.value


def test_kl_controllers_reject_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveKLController(init_value=0.2, target=0.0, horizon=10000)
    with pytest.raises(ValueError):
        AdaptiveKLController(init_value=0.2, target=6.0, horizon=0)
    with pytest.raises(ValueError):
        FixedKLController(-0.1)
    with pytest.raises(ValueError):
        FixedKLController(0.1).load_state_dict({"value": float("nan")})
