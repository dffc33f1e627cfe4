"""Golden tests for rlhf.ppo.losses: PPO's clipped policy loss (with DAPO's clip-higher and token weights),
GSPO and CISPO, and the clipped value loss. GSPO and CISPO are also checked against TRL 1.16.0's formulas
(trl/trainer/grpo_trainer.py), transcribed.

Expected values are derived by hand, with the arithmetic written next to each one. Padding positions hold
large values on purpose, so a function that ignored its mask would fail.
"""

from __future__ import annotations

import math

import torch

from rlhf.ppo import cispo_policy_loss, gspo_policy_loss, policy_loss, value_loss
from rlhf.ppo.aggregation import aggregate


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


# ---- policy_loss: clip-higher and token weights ---------------------------------------------------------


def _from_ratios(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs with grad, old_logprobs) whose ratio exp(logprobs - old) is `ratios`."""
    old = torch.full(ratios.shape, -1.0, dtype=torch.float64)
    return (old + ratios.log()).requires_grad_(True), old


def test_policy_loss_clip_higher_hand_values():
    ratios = torch.tensor([[1.25, 1.5, 0.7], [1.4, 3.0, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp, old = _from_ratios(ratios)
    # clip(r, 1 - 0.2, 1 + 0.28) = clip(r, 0.8, 1.28); per token max(-r A, -clip(r) A):
    #   A=+1, r=1.25: max(-1.25, -1.25) = -1.25  inside [0.8, 1.28]: not clipped (symmetric: -1.2, clipped)
    #   A=+1, r=1.5:  max(-1.5,  -1.28) = -1.28  clipped at the higher bound
    #   A=-1, r=0.7:  max( 0.7,   0.8)  =  0.8   clipped at the unchanged lower bound
    #   A=-1, r=1.4:  max( 1.4,   1.28) =  1.4   unclipped; padding ignored
    # loss = (-1.25 - 1.28 + 0.8 + 1.4) / 4 = -0.33 / 4 = -0.0825; clipfrac = 2 / 4
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, clip_range_high=0.28)
    close(loss.detach(), -0.0825, atol=1e-12)
    close(stats["clipfrac"], 0.5, atol=1e-12)
    # d loss / d logp = -A r / 4 on unclipped tokens: [-1.25 / 4, 0, 0] and [1.4 / 4, 0, 0]
    loss.backward()
    close(logp.grad, [[-0.3125, 0.0, 0.0], [0.35, 0.0, 0.0]], atol=1e-12)
    # Symmetric (None): r=1.25 is clipped at 1.2 too: (-1.2 - 1.2 + 0.8 + 1.4) / 4 = -0.05, clipfrac 3 / 4
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    close(loss.detach(), -0.05, atol=1e-12)
    close(stats["clipfrac"], 0.75, atol=1e-12)


def test_policy_loss_without_new_keywords_is_the_old_formula_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=gen)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 5, generator=gen)
    adv = torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, clip_range_high=None, token_weights=None)
    (grad,) = torch.autograd.grad(loss, logp)
    # The formula before clip_range_high and token_weights existed, transcribed.
    logp2 = logp.detach().clone().requires_grad_(True)
    ratio = torch.exp(logp2 - old)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    expected = torch.where(mask, per_token, 0.0).sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, logp2)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    assert stats["clipfrac"] > 0  # the batch does clip, so the comparison covers the clipped branch


def test_policy_loss_token_weights_hand_values():
    # The batch of test_policy_loss_clipping_hand_values: per-token losses [-1.2, -0.5, 1.5] and [0.8, -2.2, pad]
    ratios = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.1, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights = torch.tensor([[0.5, 2.0, 0.0], [1.0, 1.5, 7.0]], dtype=torch.float64, requires_grad=True)
    logp, old = _from_ratios(ratios)
    # weighted: -1.2 * 0.5 = -0.6, -0.5 * 2 = -1.0, 1.5 * 0 = 0, 0.8 * 1 = 0.8, -2.2 * 1.5 = -3.3
    # loss = (-0.6 - 1.0 + 0 + 0.8 - 3.3) / 5 = -4.1 / 5 = -0.82 (the loss statistic too); clipfrac unchanged
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, token_weights=weights)
    close(loss.detach(), -0.82, atol=1e-12)
    close(stats["loss"], -0.82, atol=1e-12)
    close(stats["clipfrac"], 0.4, atol=1e-12)
    # d loss / d logp = -A r w / 5 on unclipped tokens: [0, -0.5 * 2 / 5, 1.5 * 0 / 5], [0, -2.2 * 1.5 / 5, 0]
    loss.backward()
    close(logp.grad, [[0.0, -0.2, 0.0], [0.0, -0.66, 0.0]], atol=1e-12)
    assert weights.grad is None  # the weights are constants


# ---- GSPO ---------------------------------------------------------------------------------------------------


def test_gspo_sequence_ratio_hand_values():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 1e4]], dtype=torch.float64)
    log_ratios = torch.tensor([[0.3, -0.1, 0.1], [-0.2, -0.4, 0.0]], dtype=torch.float64)
    logp = (old + log_ratios).detach()
    logp[1, 2] = float("nan")  # padding
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # s_0 = exp((0.3 - 0.1 + 0.1) / 3) = e^0.1 = 1.105171; s_1 = exp((-0.2 - 0.4) / 2) = e^-0.3 = 0.740818
    # row 0, A=+1: s_0 in [0.8, 1.2], unclipped: -1.105171 on each of 3 tokens
    # row 1, A=-1: max(s_1, clip(s_1)) = max(0.740818, 0.8) = 0.8 clipped, on each of 2 tokens
    # loss = (3 * -e^0.1 + 2 * 0.8) / 5; clipfrac = 2 / 5; ratio_mean = (3 e^0.1 + 2 e^-0.3) / 5
    loss, stats = gspo_policy_loss(logp, old, adv, mask, 0.2)
    close(loss.detach(), (-3 * math.exp(0.1) + 1.6) / 5, atol=1e-12)
    close(stats["clipfrac"], 0.4, atol=1e-12)
    close(stats["ratio_mean"], (3 * math.exp(0.1) + 2 * math.exp(-0.3)) / 5, atol=1e-12)
    # d/dlogp_t of -A s_i,t / 5 = -A s_i / 5 on unclipped tokens: -e^0.1 / 5 = -0.221034 on row 0, 0 elsewhere
    loss.backward()
    g = -math.exp(0.1) / 5
    close(logp.grad, [[g, g, g], [0.0, 0.0, 0.0]], atol=1e-12)
    # clip_range_high = 0.05: s_0 = 1.105 > 1.05 is clipped too: (3 * -1.05 + 2 * 0.8) / 5 = -0.31, clipfrac 1
    loss, stats = gspo_policy_loss(logp, old, adv, mask, 0.2, clip_range_high=0.05)
    close(loss.detach(), -0.31, atol=1e-12)
    close(stats["clipfrac"], 1.0, atol=1e-12)


def _trl_gspo(logp, old, adv_seq, mask, eps_low, eps_high, loss_type):
    """TRL 1.16.0 grpo_trainer.py 3083-3095, 3113-3120, 3153-3162 (importance_sampling_level="sequence")."""
    mask = mask.to(logp.dtype)
    log_ratio = logp - old
    log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    advantages = adv_seq.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B, 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # "bnpo"; "dapo" with one process


def test_gspo_matches_trl_sequence_level_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    B, T = 4, 5
    mask = torch.tensor([[True] * 5, [True] * 4 + [False], [True] * 2 + [False] * 3, [True] * 3 + [False] * 2])
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv_seq = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)

    def mean_of_sequences(per_token):
        return aggregate(per_token, mask, "sequence_mean", num_sequences=B, num_tokens=mask.sum(), max_len=T)

    for loss_type, reduce in (("bnpo", None), ("grpo", mean_of_sequences)):
        ours_logp = logp.clone().requires_grad_(True)
        trl_logp = logp.clone().requires_grad_(True)
        ours, stats = gspo_policy_loss(ours_logp, old, adv_seq.unsqueeze(1).expand(B, T), mask, 0.03, 0.04, reduce)
        trl = _trl_gspo(trl_logp, old, adv_seq, mask, 0.03, 0.04, loss_type)
        ours.backward()
        trl.backward()
        close(ours.detach(), trl.detach(), atol=1e-12)
        close(ours_logp.grad, trl_logp.grad, atol=1e-12)
        assert 0 < stats["clipfrac"] < 1  # both branches of the clip are exercised
        assert trl_logp.grad.abs().sum() > 0


# ---- CISPO --------------------------------------------------------------------------------------------------


def test_cispo_hand_values_every_token_keeps_a_gradient():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.0, 1.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, float("nan"), float("nan")]], dtype=torch.float64)
    old = logp - ratios.log()
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0], [3.0, float("inf"), 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # w = sg(min(r, 1 + 0.2)) (no lower bound): [1.2, 0.5, 1.1], [0.5]
    # per token -w A logp: -1.2 * 1 * -1 = 1.2, -0.5 * -1 * -2 = -1.0, -1.1 * 2 * -0.5 = 1.1, -0.5 * 3 * -0.2 = 0.3
    # loss = (1.2 - 1.0 + 1.1 + 0.3) / 4 = 0.4; clipfrac = 1 / 4; ratio_mean = (1.5 + 0.5 + 1.1 + 0.5) / 4 = 0.9
    loss, stats = cispo_policy_loss(logp, old, adv, mask, 0.2)
    close(loss.detach(), 0.4, atol=1e-12)
    close(stats["clipfrac"], 0.25, atol=1e-12)
    close(stats["ratio_mean"], 0.9, atol=1e-12)
    # d loss / d logp = -w A / 4: [-0.3, 0.125, -0.55], [-0.375, 0 (padding), 0]. The clipped token (r=1.5)
    # keeps its gradient, where PPO's clip would give it 0.
    loss.backward()
    close(logp.grad, [[-0.3, 0.125, -0.55], [-0.375, 0.0, 0.0]], atol=1e-12)
    # clip_range_low = 0.4, floor 0.6: w = [1.2, 0.6, 1.1], [0.6]
    # loss = (1.2 - 0.6 * 2 + 1.1 + 0.6 * 3 * 0.2) / 4 = (1.2 - 1.2 + 1.1 + 0.36) / 4 = 0.365; clipfrac 3 / 4
    loss, stats = cispo_policy_loss(logp, old, adv, mask, 0.2, clip_range_low=0.4)
    close(loss.detach(), 0.365, atol=1e-12)
    close(stats["clipfrac"], 0.75, atol=1e-12)


def test_cispo_matches_trl():
    gen = torch.Generator().manual_seed(2)
    B, T = 3, 4
    mask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2, [True] * 3 + [False]])
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    epsilon_high = 1.2  # TRL's cap; here clip_range_high = epsilon_high - 1
    ours_logp = logp.clone().requires_grad_(True)
    trl_logp = logp.clone().requires_grad_(True)
    ours, stats = cispo_policy_loss(ours_logp, old, adv, mask, epsilon_high - 1.0)
    # TRL 1.16.0 grpo_trainer.py 3109-3111, then the "cispo" normalisation (3168-3173) for one process
    coef_1 = torch.exp(trl_logp - old)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    per_token_loss = -clamped_ratios * adv * trl_logp
    trl = (per_token_loss * mask).sum() / mask.sum()
    ours.backward()
    trl.backward()
    close(ours.detach(), trl.detach(), atol=1e-12)
    close(ours_logp.grad, trl_logp.grad, atol=1e-12)
    assert 0 < stats["clipfrac"] < 1
