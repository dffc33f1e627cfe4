"""The clipped losses of the RL update, as pure functions on tensors (conventions: rlhf/ppo/core.py).

    policy_loss        PPO's clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher: an upper
                       clip range of its own (Yu et al. 2025, arXiv 2503.14476)
    gspo_policy_loss   GSPO: one ratio per sequence, the geometric mean of its token ratios, clipped
                       (Zheng et al. 2025, arXiv 2507.18071), in its GSPO-token form
    cispo_policy_loss  CISPO: the importance weight is clipped and detached, so every token keeps a
                       gradient (MiniMax-M1, arXiv 2506.13585)
    value_loss         PPO's clipped value loss (Ziegler et al. 2019; Huang et al. 2024, detail 9)

Each takes per-token tensors (B, T) and a response mask, and returns (loss, detached statistics). The
policy losses share their optional arguments: `reduce` (rlhf/ppo/aggregation.py) replaces the token mean,
and `token_weights` (B, T), detached constants such as the training-inference mismatch correction of
rlhf/ppo/correction.py, multiply each per-token loss before the reduction (as TRL's GRPOTrainer multiplies
its per_token_loss by importance_sampling_ratio).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.ppo.core import kl_k3, masked_mean

__all__ = ["POLICY_LOSSES", "cispo_policy_loss", "gspo_policy_loss", "policy_loss", "value_loss"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _reduce(per_token: torch.Tensor, response_mask: torch.Tensor, reduce: Reduce | None,
            token_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, token mean) of the per-token losses (B, T), weighted by `token_weights` when given."""
    if token_weights is not None:
        per_token = per_token * token_weights.detach()  # (B, T)
    token_mean = masked_mean(per_token, response_mask)
    return (token_mean if reduce is None else reduce(per_token)), token_mean


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: float,
                       high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r * A, clip(r, 1 - low, 1 + high) * A) (B, T), and where the clipped term was selected
    (strictly larger loss) (B, T) bool."""
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)  # (B, T)
    # max of the negated terms == -min of the surrogate terms.
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _policy_stats(token_mean: torch.Tensor, clipped: torch.Tensor, old_logprobs: torch.Tensor,
                  logprobs: torch.Tensor, ratio: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics every policy loss reports; `clipped` (B, T) bool marks the tokens clipping changed."""
    with torch.no_grad():
        return {
            "loss": token_mean.detach(),
            "clipfrac": masked_mean(clipped.to(ratio.dtype), response_mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask),
            "ratio_mean": masked_mean(ratio.detach(), response_mask),
        }


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    reduce: Reduce | None = None,
    *,
    clip_range_high: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss: masked mean over tokens of -min(r * A, clip(r, 1 - c, 1 + c_high) * A).

    logprobs (B, T) from the current policy (with grad), old_logprobs and advantages (B, T) from the
    rollout (treated as constants), r = exp(logprobs - old_logprobs). The mean is over all real tokens
    of the batch, so long responses weigh more than short ones. `reduce` replaces that mean: it takes
    the per-token losses (B, T) (padding included, which it must mask) and returns the loss
    (rlhf/ppo/aggregation.py); the `loss` statistic stays the token mean.

    clip_range_high: DAPO's clip-higher, c_high (0.28 in the paper, with c = 0.2): a wider upper bound
    lets a token the policy finds unlikely but rewarding gain probability, against entropy collapse.
    None: c_high = c, the symmetric clip. token_weights (B, T): detached constants multiplying each
    per-token loss before the reduction (the `loss` statistic included); None changes nothing.

    Stats (detached 0-dim tensors):
      loss        the token mean of the loss
      clipfrac    fraction of real tokens where the clipped term was selected (strictly larger loss)
      approx_kl   k3 estimate of KL(old || new) = mean((r - 1) - log r); samples come from the old
                  policy, non-negative per token
      ratio_mean  mean of r over real tokens (should stay near 1)
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    per_token, was_clipped = _clipped_surrogate(ratio, advantages, clip_range, high)
    loss, token_mean = _reduce(per_token, response_mask, reduce, token_weights)
    return loss, _policy_stats(token_mean, was_clipped, old_logprobs, logprobs, ratio, response_mask)


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    reduce: Reduce | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's clipped surrogate: PPO's, with every token of sequence i sharing one ratio s_i.

        s_i   = exp(mean over the real tokens of sequence i of (logprobs - old_logprobs))
        s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])        (GSPO-token: value s_i, d/dlogp_t = s_i)
        loss  = masked mean of -min(s_i,t * A, clip(s_i,t, 1 - c, 1 + c_high) * A)

    The geometric mean keeps s_i on the scale of one token's ratio whatever the length, so the paper's
    clip ranges are tiny (c = 3e-4, c_high = 4e-4). Arguments as `policy_loss` (c_high = c when None).

    Matches TRL's GRPOTrainer with importance_sampling_level="sequence" (trl 1.16.0,
    trl/trainer/grpo_trainer.py lines 3086-3095 and 3113-3120: coef_1 = exp((log_ratio * mask).sum(-1) /
    mask.sum(-1).clamp(min=1)), shape (B, 1), clipped and broadcast to the tokens): same value, and the same
    gradient whenever advantages and token_weights are constant within a sequence (then the token sum of
    s_i / n_i * grad logp over the n_i tokens equals GSPO-token's s_i * grad logp_t, under any reduction
    whose weights depend only on the sequence). Per-token advantages or weights are where GSPO-token
    differs, as the paper intends.

    Stats: those of `policy_loss`, per token, with s_i,t as the ratio (ratio_mean: the mean of s_i over
    real tokens, so longer sequences weigh more; approx_kl: the token-level k3 of old vs new).
    """
    response_mask = response_mask.bool()
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Padding set to 0 before any exp, so a NaN or huge value there reaches neither s_i nor a gradient.
    real_logprobs = torch.where(response_mask, logprobs, zero)  # (B, T)
    log_ratio = torch.where(response_mask, logprobs.detach() - old_logprobs, zero)  # (B, T)
    seq_log_ratio = masked_mean(log_ratio, response_mask, dim=1)  # (B,), log s_i
    ratio = torch.exp(seq_log_ratio.unsqueeze(1) + real_logprobs - real_logprobs.detach())  # (B, T), s_i,t
    high = clip_range if clip_range_high is None else clip_range_high
    advantages = torch.where(response_mask, advantages, zero)  # (B, T)
    per_token, was_clipped = _clipped_surrogate(ratio, advantages, clip_range, high)
    loss, token_mean = _reduce(per_token, response_mask, reduce, token_weights)
    return loss, _policy_stats(token_mean, was_clipped, old_logprobs, logprobs, ratio, response_mask)


def cispo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range_high: float,
    clip_range_low: float | None = None,
    reduce: Reduce | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: masked mean over tokens of -sg(clip(r, 1 - c_low, 1 + c_high)) * A * logprobs.

    r = exp(logprobs - old_logprobs). PPO's clip zeroes the gradient of a clipped token; CISPO clips the
    importance weight instead and detaches it, so every token keeps the REINFORCE gradient -w * A, capped
    in size. The value -w * A * logprobs only carries that gradient; it is not a surrogate objective to
    read. clip_range_low None: no lower bound, as in the paper (which only tunes the upper one) and TRL.

    Matches TRL's GRPOTrainer loss_type="cispo" (trl 1.16.0, trl/trainer/grpo_trainer.py lines 3109-3111:
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach(); per_token_loss = -clamped_ratios *
    advantages * per_token_logps). TRL's `epsilon_high` is the cap itself (ScaleRL's eps_max, 5.0
    recommended), not 1 + eps as in its PPO clip: TRL epsilon_high = 1 + clip_range_high here, and TRL
    has no lower bound (clip_range_low=None). Arguments otherwise as `policy_loss`.

    Stats: those of `policy_loss`; clipfrac is the fraction of real tokens whose weight was clipped,
    whatever the advantage's sign (TRL's cispo_clip_ratio counts only tokens with A > 0).
    """
    response_mask = response_mask.bool()
    old_logprobs = old_logprobs.detach()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    ratio = torch.exp(torch.where(response_mask, logprobs.detach() - old_logprobs, zero))  # (B, T), constant
    low = None if clip_range_low is None else 1.0 - clip_range_low
    weight = torch.clamp(ratio, min=low, max=1.0 + clip_range_high)  # (B, T)
    # Padding's coefficient is 0, so its gradient is 0 even when its logprob or advantage is inf or NaN.
    coef = torch.where(response_mask, -weight * advantages.detach(), zero)  # (B, T)
    per_token = coef * logprobs  # (B, T)
    loss, token_mean = _reduce(per_token, response_mask, reduce, token_weights)
    return loss, _policy_stats(token_mean, weight != ratio, old_logprobs, logprobs, ratio, response_mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).

    values (B, T) from the current value head (with grad); old_values and returns (B, T) from the
    rollout (treated as constants). Taking the max makes clipping pessimistic: the value head gains
    nothing by moving more than `clip_range` away from its rollout-time prediction.

    Stats (detached 0-dim tensors): clipfrac, the fraction of real tokens where the clipped error was
    strictly larger and therefore selected.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    unclipped_err = (values - returns) ** 2  # (B, T)
    clipped_err = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), response_mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).to(values.dtype), response_mask)}
    return loss, stats


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "ppo": lambda lp, old, adv, mask, low, high, **kw: policy_loss(lp, old, adv, mask, low, clip_range_high=high, **kw),
    "gspo": lambda lp, old, adv, mask, low, high, **kw: gspo_policy_loss(lp, old, adv, mask, low, high, **kw),
    "cispo": lambda lp, old, adv, mask, low, high, **kw: cispo_policy_loss(lp, old, adv, mask, high, **kw),
}
"""The policy losses by name, called alike: (logprobs, old_logprobs, advantages, response_mask, clip_range,
clip_range_high, reduce=..., token_weights=...). CISPO takes only the upper bound, 1 + clip_range_high."""
