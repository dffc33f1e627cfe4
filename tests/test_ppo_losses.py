"""Golden tests for rlhf.ppo.losses: PPO's clipped policy and value losses.

Expected values are derived by hand, with the arithmetic written next to each one. Padding positions hold
large values on purpose, so a function that ignored its mask would fail.
"""

from __future__ import annotations

import math

import torch

from rlhf.ppo import policy_loss, value_loss


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """Assert `actual` equals `expected` elementwise within a tight absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def test_policy_loss_clipping_hand_values():
    clip = 0.2
    ratios = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.1, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    # per token -min(r A, clip(r, 0.8, 1.2) A) = max(-r A, -clip(r) A):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped (active)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5   unclipped
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5   unclipped
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped (active)
    #   A=+2, r=1.1: max(-2.2, -2.2) = -2.2   inside the range, not counted as clipped
    #   padding (A=100, r=3) ignored
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5 = -0.32; clipfrac = 2 / 5 = 0.4
    # ratio_mean = (1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5 = 1.02
    # approx_kl = mean((r - 1) - ln r) = [2 (0.5 - ln 1.5) + 2 (-0.5 - ln 0.5) + (0.1 - ln 1.1)] / 5
    loss, stats = policy_loss(logp, old, adv, mask, clip)
    close(loss.detach(), -0.32, atol=1e-12)
    close(stats["clipfrac"], 0.4, atol=1e-12)
    close(stats["ratio_mean"], 1.02, atol=1e-12)
    approx_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 5
    close(stats["approx_kl"], approx_kl, atol=1e-12)
    # d loss / d logp = -A r / 5 where the unclipped term is selected, 0 where clipping is active:
    #   [0, -0.5 / 5, 1.5 / 5] and [0, -2.2 / 5, 0 (padding)]
    loss.backward()
    close(logp.grad, [[0.0, -0.1, 0.3], [0.0, -0.44, 0.0]], atol=1e-12)


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 0.5], [2.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -3.0]])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2)
    # r = 1 everywhere: loss = -mean(A over real) = -(1 - 3 + 0.5 + 2) / 4 = -0.5 / 4 = -0.125
    close(loss, -0.125)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


def test_value_loss_clipping_hand_values():
    clip = 0.2
    values = torch.tensor([[1.5, 1.5, 1.1], [-0.5, -0.5, 10.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 0.0], [0.0, -1.0, -10.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # clipped v = old + clamp(v - old, -0.2, 0.2); per token max((v - R)^2, (v_clip - R)^2):
    #   v=1.5, old=1, R=2:   (-0.5)^2 = 0.25, v_clip=1.2: (-0.8)^2 = 0.64 -> 0.64 clipped (active)
    #   v=1.5, old=1, R=1:   0.25,            v_clip=1.2: 0.2^2   = 0.04 -> 0.25
    #   v=1.1, old=1, R=0:   1.21,            v_clip=1.1: 1.21          -> 1.21 not clipped
    #   v=-0.5, old=0, R=0:  0.25,            v_clip=-0.2: 0.04         -> 0.25
    #   v=-0.5, old=0, R=-1: 0.25,            v_clip=-0.2: 0.64         -> 0.64 clipped (active)
    #   padding ignored
    # loss = 0.5 * (0.64 + 0.25 + 1.21 + 0.25 + 0.64) / 5 = 0.5 * 2.99 / 5 = 0.299; clipfrac = 2/5
    loss, stats = value_loss(values, old, returns, mask, clip)
    close(loss.detach(), 0.299, atol=1e-12)
    close(stats["clipfrac"], 0.4, atol=1e-12)
    # Gradient flows only through unclipped tokens: d/dv 0.5 (v - R)^2 / 5 = (v - R) / 5
    #   [0, 0.5 / 5, 1.1 / 5] and [-0.5 / 5, 0, 0]
    loss.backward()
    close(values.grad, [[0.0, 0.1, 0.22], [-0.1, 0.0, 0.0]], atol=1e-12)
