"""Training-inference mismatch correction: importance weights for rollouts sampled by another engine.

The inference engine (vLLM, SGLang) samples the rollouts and reports their log-probabilities; the trainer
recomputes them. Kernels, precision and batching differ, so the two policies disagree a little on most
tokens and a lot on a few, and the update, which assumes samples from the trainer's policy, is biased
(Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; Liu, Li et al.
2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch").
Weighting each token's loss by r = pi_trainer(y) / pi_engine(y) removes the bias; bounding r keeps the
variance finite:

    truncate (TIS)   w = min(r, upper), and max(w, lower) when lower is given
    mask (MIS)       w = r where lower <= r <= upper, else 0 (the sample is rejected)

with one r per token (level "token") or one per sequence (level "sequence": the product of its token
ratios, exp of the sum of their logs). The weights enter the policy loss as `token_weights`
(rlhf/ppo/losses.py), with the trainer's recomputed log-probabilities as `old_logprobs`.

This is TRL's vllm_importance_sampling_correction (trl 1.16.0: trl/trainer/grpo_trainer.py lines 2660-2708
compute the ratio, line 3147 multiplies per_token_loss by it; modes and bounds documented in
trl/trainer/grpo_config.py lines 322-345) and veRL's rollout correction (volcengine/verl b178a3c,
verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights, lines 481-565, and the
log-space safety bound SAFETY_BOUND = 20, line 75).
"""

from __future__ import annotations

import math

import torch

from rlhf.ppo.core import kl_k3, masked_mean

__all__ = ["LEVELS", "MAX_LOG_RATIO", "MODES", "importance_weights"]

LEVELS = ("token", "sequence")
"""Where one ratio applies: each token, or every token of a sequence."""

MODES = ("truncate", "mask")
"""What an out-of-bounds ratio becomes: the bound (TIS), or weight 0 (MIS)."""

MAX_LOG_RATIO = 20.0
"""Log ratios are clamped to at most 20 before exp (e^20 ~ 4.9e8, finite in float32 and bf16); veRL uses +-20."""


def _check(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, response_mask: torch.Tensor,
           level: str, mode: str, upper: float, lower: float | None) -> None:
    """Raise ValueError naming the first argument that is out of its domain."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not upper >= 1.0:  # also rejects NaN
        raise ValueError(f"upper must be >= 1 (a bound on pi_trainer / pi_engine, e.g. 2.0), got {upper}")
    if lower is not None and not 0.0 < lower <= 1.0:
        raise ValueError(f"lower must be in (0, 1] (e.g. 1 / upper) or None for no lower bound, got {lower}")
    if not trainer_logprobs.shape == engine_logprobs.shape == response_mask.shape:
        raise ValueError(f"trainer_logprobs {tuple(trainer_logprobs.shape)}, engine_logprobs "
                         f"{tuple(engine_logprobs.shape)} and response_mask {tuple(response_mask.shape)} "
                         "must have the same shape (B, T)")


def importance_weights(
    trainer_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    level: str,
    mode: str,
    upper: float,
    lower: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bounded importance weights pi_trainer / pi_engine (B, T), detached, and their statistics.

    trainer_logprobs (B, T): the trainer's log-probabilities of the sampled tokens; engine_logprobs (B, T):
    the inference engine's, for the same tokens; response_mask (B, T) bool, True = a real response token.
    level "token": r_t = exp(trainer_t - engine_t); "sequence": r = exp(sum over the real tokens of
    (trainer_t - engine_t)), given to each of them (the sum, as TRL's sequence_* modes and veRL's
    "sequence"; veRL's "geometric" rejection uses the mean). mode "truncate": w = clamp(r, lower, upper);
    "mask": w = r inside [lower, upper], else 0. Masked weights keep the ratio r, not 1, as TRL's *_mask
    modes (masked_fill of the ratio with 0); veRL instead drops the sample from the response mask and
    weights the rest separately. lower None: no lower bound (TRL's default; veRL's rejection defaults to
    1 / upper). Padding gets weight 0.

    Everything is computed in log space on detached float32 (or float64) copies: the log ratio is clamped
    to at most MAX_LOG_RATIO before exp, so a log ratio of 1000 (a stale or broken engine logprob, the overflow
    that NaNs asynchronous runs) gives a finite weight, never inf or NaN; bounds are compared in log space
    on the unclamped value. NaN or inf in padding never leaks. A NaN on a real token (a token the engine
    could not score) counts as no mismatch, log ratio 0, as in TRL.

    Stats (detached 0-dim tensors; computed from the clamped log ratio (+-MAX_LOG_RATIO for the KL
    estimates), so they stay finite; a ratio past e^20 reads as e^20):
      mismatch_kl       k3 estimate of KL(engine || trainer) (samples come from the engine), mean over
                        real tokens of (r_t - 1) - log r_t, >= 0; exactly 0 when the logprobs agree
      mismatch_k1       k1 estimate of the same KL: mean over real tokens of engine_t - trainer_t
      truncated_share   (mode "truncate") share of real tokens, or of sequences with a real token at level
      / masked_share    "sequence", whose weight differs from r: ratio out of [lower, upper]
      ratio_mean        mean of r (before bounding) over real tokens, or over sequences
      ratio_max         largest r (before bounding) over real tokens, or over sequences
      weight_mean       mean of the returned weights over real tokens
    """
    _check(trainer_logprobs, engine_logprobs, response_mask, level, mode, upper, lower)
    with torch.no_grad():
        mask = response_mask.bool()
        dtype = torch.promote_types(trainer_logprobs.dtype, torch.float32)
        zero = torch.zeros((), dtype=dtype, device=trainer_logprobs.device)
        diff = trainer_logprobs.detach().to(dtype) - engine_logprobs.detach().to(dtype)  # (B, T)
        log_ratio = torch.where(mask & ~diff.isnan(), diff, zero)  # (B, T), 0 on padding
        if level == "token":
            unit_log_ratio, unit_mask = log_ratio, mask  # (B, T): one ratio per token
        else:
            unit_log_ratio, unit_mask = log_ratio.sum(dim=1), mask.any(dim=1)  # (B,): one per sequence
        log_upper = math.log(upper)
        log_lower = -math.inf if lower is None else math.log(lower)
        out_of_bounds = (unit_log_ratio > log_upper) | (unit_log_ratio < log_lower)
        # Clamped above only: exp of a very negative log ratio underflows to 0, which is the true weight.
        ratio = torch.exp(unit_log_ratio.clamp(max=MAX_LOG_RATIO))
        if mode == "truncate":
            weight = ratio.clamp(min=lower, max=upper)
        else:
            weight = torch.where(out_of_bounds, zero, ratio)
        if level == "sequence":
            weight = weight.unsqueeze(1).expand_as(log_ratio)  # (B, T)
        weights = torch.where(mask, weight, zero)  # (B, T)
        # k3 depends only on the log ratio: kl_k3(engine, trainer) with engine = 0, trainer = log r.
        k3 = kl_k3(torch.zeros_like(log_ratio), log_ratio, max_log_ratio=MAX_LOG_RATIO, max_kl=math.inf)
        share_name = "truncated_share" if mode == "truncate" else "masked_share"
        stats = {
            "mismatch_kl": masked_mean(k3, mask),
            "mismatch_k1": masked_mean(-log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), mask),
            share_name: masked_mean(out_of_bounds.to(dtype), unit_mask),
            "ratio_mean": masked_mean(ratio, unit_mask),
            "ratio_max": torch.where(unit_mask, ratio, zero).amax(),  # r > 0, so an empty batch gives 0
            "weight_mean": masked_mean(weights, mask),
        }
    return weights, stats
