"""Golden tests for rlhf.ppo.correction: training-inference mismatch importance weights (TIS / MIS).

Expected weights are derived by hand, with the arithmetic next to each; padding holds NaN and huge values
on purpose. The last test transcribes TRL 1.16.0's vllm_importance_sampling_correction
(trl/trainer/grpo_trainer.py lines 2660-2703) and compares on a random batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import importance_weights, policy_loss

MASK = torch.tensor([[True, True, True], [True, True, False]])
# Token ratios r = pi_trainer / pi_engine: [2.5, 0.5, 1.2] and [0.1, 3.0, padding].
# Sequence ratios (products): 2.5 * 0.5 * 1.2 = 1.5 and 0.1 * 3.0 = 0.3.
RATIOS = torch.tensor([[2.5, 0.5, 1.2], [0.1, 3.0, 1.0]], dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    """Assert `actual` equals `expected` elementwise within a tight absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def logprobs(ratios: torch.Tensor = RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """(trainer, engine) log-probabilities with trainer - engine = log ratios; padding holds 1e30 and NaN."""
    engine = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, float("nan")]], dtype=torch.float64)
    trainer = engine + ratios.log()
    trainer[1, 2] = 1e30
    return trainer, engine


@pytest.mark.parametrize(
    ("level", "mode", "upper", "lower", "weights", "share"),
    [
        # min(r, 2): [2, 0.5, 1.2], [0.1, 2]; 2.5 and 3 truncated: 2 / 5 tokens
        ("token", "truncate", 2.0, None, [[2.0, 0.5, 1.2], [0.1, 2.0, 0.0]], 0.4),
        # clamp(r, 0.2, 2): 0.1 -> 0.2 as well: 3 / 5
        ("token", "truncate", 2.0, 0.2, [[2.0, 0.5, 1.2], [0.2, 2.0, 0.0]], 0.6),
        # r outside [0, 2] -> 0, the others keep r: 2.5 and 3 masked, 2 / 5
        ("token", "mask", 2.0, None, [[0.0, 0.5, 1.2], [0.1, 0.0, 0.0]], 0.4),
        # r outside [0.2, 2] -> 0: 0.1 masked too, 3 / 5
        ("token", "mask", 2.0, 0.2, [[0.0, 0.5, 1.2], [0.0, 0.0, 0.0]], 0.6),
        # sequences 1.5 and 0.3: min(1.5, 1.4) = 1.4 on row 0's tokens, 0.3 on row 1's; 1 of 2 sequences
        ("sequence", "truncate", 1.4, None, [[1.4, 1.4, 1.4], [0.3, 0.3, 0.0]], 0.5),
        # clamp(., 0.5, 1.4): both sequences changed
        ("sequence", "truncate", 1.4, 0.5, [[1.4, 1.4, 1.4], [0.5, 0.5, 0.0]], 1.0),
        # 1.5 in [0.5, 2] keeps its ratio; 0.3 < 0.5 is masked
        ("sequence", "mask", 2.0, 0.5, [[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]], 0.5),
        # 1.5 > 1.4 masked; 0.3 kept (no lower bound)
        ("sequence", "mask", 1.4, None, [[0.0, 0.0, 0.0], [0.3, 0.3, 0.0]], 0.5),
    ],
)
def test_importance_weights_hand_values(level, mode, upper, lower, weights, share):
    trainer, engine = logprobs()
    w, stats = importance_weights(trainer, engine, MASK, level, mode, upper, lower)
    close(w, weights)
    close(stats["truncated_share" if mode == "truncate" else "masked_share"], share)
    close(stats["weight_mean"], sum(sum(row) for row in weights) / 5)
    if level == "token":  # before bounding: (2.5 + 0.5 + 1.2 + 0.1 + 3) / 5 = 7.3 / 5; max 3
        close(stats["ratio_mean"], 1.46)
        close(stats["ratio_max"], 3.0)
    else:  # per sequence: (1.5 + 0.3) / 2 = 0.9; max 1.5
        close(stats["ratio_mean"], 0.9)
        close(stats["ratio_max"], 1.5)
    # k3 of KL(engine || trainer), mean over the 5 real tokens of (r - 1) - ln r:
    #   sum (r - 1) = 1.5 - 0.5 + 0.2 - 0.9 + 2 = 2.3; sum ln r = ln(2.5 * 0.5 * 1.2 * 0.1 * 3) = ln 0.45
    #   k3 = (2.3 - ln 0.45) / 5 = 0.619702; k1 = mean(engine - trainer) = -ln 0.45 / 5 = 0.159702
    close(stats["mismatch_kl"], (2.3 - math.log(0.45)) / 5)
    close(stats["mismatch_k1"], -math.log(0.45) / 5)
    assert not w.requires_grad and all(torch.isfinite(v) for v in stats.values())


def test_identical_logprobs_give_weight_one_and_zero_kl():
    trainer, _ = logprobs()
    engine = trainer.clone()
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w, stats = importance_weights(trainer, engine, MASK, level, mode, 2.0, 0.5)
            assert torch.equal(w, MASK.to(w.dtype))  # exactly 1 on real tokens, 0 on padding
            assert stats["mismatch_kl"].item() == 0.0 and stats["mismatch_k1"].item() == 0.0
    # One token off by 0.01 nats: its weight is e^0.01 and k3 = (e^0.01 - 1 - 0.01) / 5 = 1.0033e-5
    engine[0, 1] -= 0.01
    w, stats = importance_weights(trainer, engine, MASK, "token", "truncate", 2.0)
    close(w, [[1.0, math.exp(0.01), 1.0], [1.0, 1.0, 0.0]])
    close(stats["mismatch_kl"], (math.expm1(0.01) - 0.01) / 5, atol=1e-15)


def test_padding_and_unscored_tokens_never_leak():
    trainer, engine = logprobs()
    trainer[0, 2], engine[0, 2] = float("inf"), float("nan")  # a real token the engine could not score
    trainer[1, 2], engine[1, 2] = float("nan"), -float("inf")  # padding
    w, stats = importance_weights(trainer, engine, MASK, "token", "mask", 2.0)
    # The unscored token counts as r = 1 (as in TRL); the rest as in the hand-values test: [0, 0.5, 1], [0.1, 0]
    close(w, [[0.0, 0.5, 1.0], [0.1, 0.0, 0.0]])
    close(stats["ratio_mean"], (2.5 + 0.5 + 1.0 + 0.1 + 3.0) / 5)
    assert all(torch.isfinite(v) for v in stats.values())


def test_log_ratio_1000_gives_finite_weights_and_gradients():
    log_ratios = torch.tensor([[1000.0, -1000.0, 0.5], [1000.0, 2.0, 0.0]], dtype=torch.float64)
    engine = torch.full((2, 3), -1.0, dtype=torch.float64)
    trainer = (engine + log_ratios).requires_grad_(True)
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w, stats = importance_weights(trainer, engine, MASK, level, mode, 2.0)
            assert torch.isfinite(w).all() and all(torch.isfinite(v) for v in stats.values())
    # token truncate: min(e^1000, 2) = 2, min(e^-1000, 2) = 0 (underflow), e^0.5, 2, min(e^2, 2) = 2;
    # 3 of 5 truncated; ratio_max reads e^20, the clamp
    w, stats = importance_weights(trainer, engine, MASK, "token", "truncate", 2.0)
    close(w, [[2.0, 0.0, math.exp(0.5)], [2.0, 2.0, 0.0]])
    close(stats["truncated_share"], 0.6)
    close(stats["ratio_max"], math.exp(20.0), atol=1e-3)
    # The weights in a loss: r = 1 (old = trainer), A = 1, so d loss / d logp = -w / 5 everywhere, finite
    loss, _ = policy_loss(trainer, trainer.detach(), torch.ones(2, 3, dtype=torch.float64), MASK, 0.2,
                          token_weights=w)
    loss.backward()
    close(trainer.grad, [[-0.4, 0.0, -math.exp(0.5) / 5], [-0.4, -0.4, 0.0]])
    # sequence level: row 0 sums to 1000 - 1000 + 0.5 = 0.5 -> e^0.5 kept; row 1 to 1002 -> masked
    w, _ = importance_weights(trainer, engine, MASK, "sequence", "mask", 2.0)
    close(w, [[math.exp(0.5)] * 3, [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"upper": 0.9}, "upper"),
        ({"upper": float("nan")}, "upper"),
        ({"lower": 0.0}, "lower"),
        ({"lower": 1.5}, "lower"),
        ({"level": "seq"}, "level"),
        ({"mode": "clip"}, "mode"),
    ],
)
def test_importance_weights_rejects_bad_arguments(kwargs, argument):
    trainer, engine = logprobs()
    args = {"level": "token", "mode": "truncate", "upper": 2.0, "lower": None} | kwargs
    with pytest.raises(ValueError, match=f"^{argument} "):
        importance_weights(trainer, engine, MASK, **args)
    with pytest.raises(ValueError, match="engine_logprobs"):
        importance_weights(trainer, engine[:, :2], MASK, "token", "truncate", 2.0)


def _trl_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask, mode, clip_min, clip_max):
    """TRL 1.16.0 grpo_trainer.py 2661-2703, transcribed (the importance_sampling_ratio it multiplies in)."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * completion_mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


def test_importance_weights_match_trl():
    gen = torch.Generator().manual_seed(4)  # a seed where every case bounds some units and not others
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4, [True] * 5 + [False]])
    engine = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    trainer = engine + 0.4 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            for upper, lower in ((2.0, None), (1.3, 0.7)):
                ours, stats = importance_weights(trainer, engine, mask, level, mode, upper, lower)
                trl = _trl_ratio(trainer, engine, mask.double(), f"{level}_{mode}", lower, upper)
                close(ours, (trl * mask).expand_as(ours))
                share = stats["truncated_share" if mode == "truncate" else "masked_share"]
                assert 0 < share < 1  # some units are bounded and some are not: both branches compared
