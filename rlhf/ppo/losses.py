"""The clipped losses of the RL update, as pure functions on tensors (conventions: rlhf/ppo/core.py).

`policy_loss` is PPO's clipped surrogate (Schulman et al. 2017), `value_loss` its clipped value loss
(Ziegler et al. 2019; Huang et al. 2024, detail 9). Both take per-token tensors (B, T) and a response
mask, and return (loss, detached statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.ppo.core import kl_k3, masked_mean

__all__ = ["policy_loss", "value_loss"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss: masked mean over tokens of -min(r * A, clip(r, 1 - c, 1 + c) * A).

    logprobs (B, T) from the current policy (with grad), old_logprobs and advantages (B, T) from the
    rollout (treated as constants), r = exp(logprobs - old_logprobs). The mean is over all real tokens
    of the batch, so long responses weigh more than short ones. `reduce` replaces that mean: it takes
    the per-token losses (B, T) (padding included, which it must mask) and returns the loss
    (rlhf/ppo/aggregation.py); the `loss` statistic stays the token mean.

    Stats (detached 0-dim tensors):
      loss        the token mean of the loss
      clipfrac    fraction of real tokens where the clipped term was selected (strictly larger loss)
      approx_kl   k3 estimate of KL(old || new) = mean((r - 1) - log r); samples come from the old
                  policy, non-negative per token
      ratio_mean  mean of r over real tokens (should stay near 1)
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    # max of the negated terms == -min of the surrogate terms.
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    token_mean = masked_mean(per_token, response_mask)
    loss = token_mean if reduce is None else reduce(per_token)
    with torch.no_grad():
        stats = {
            "loss": token_mean.detach(),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs, logprobs), response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }
    return loss, stats


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
