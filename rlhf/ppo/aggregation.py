"""How per-token losses become one minibatch loss, exactly, however the minibatch is split.

    token_mean            sum of all the minibatch's token losses / its number of tokens (PPO's; DAPO's)
    sequence_mean         each sequence's token mean, averaged over sequences (the original GRPO)
    sequence_sum          each sequence's token sum / a constant max_len, averaged over sequences (Dr. GRPO)

Every mode is a weighted sum over tokens, sum_i sum_t w_it * l_it, whose weights depend only on the
token's own sequence and on counts of the whole minibatch (its sequences S and tokens N over all ranks):

    token_mean      w_it = 1 / N
    sequence_mean   w_it = 1 / (S * n_i)          n_i: the real tokens of sequence i
    sequence_sum    w_it = 1 / (S * max_len)

So a micro-batch's contribution, with the counts of the whole minibatch, sums over micro-batches and
ranks to the loss of the whole minibatch: gradient accumulation and N processes change nothing. The
mistakes peers made here (a mean per micro-batch, a count per rank, padding counted in a denominator)
all break that sum; tests/test_ppo_aggregation.py checks it against the whole minibatch. Data-parallel wrappers
average gradients over ranks, so callers pass counts already divided by the number of ranks
(`RLLaunch.minibatch_count`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.ppo.core import masked_sum

__all__ = ["AGGREGATIONS", "aggregate"]


def _token_mean(loss, mask, num_sequences, num_tokens, max_len):
    return masked_sum(loss, mask) / num_tokens


def _sequence_mean(loss, mask, num_sequences, num_tokens, max_len):
    per_sequence = masked_sum(loss, mask, dim=1) / mask.sum(dim=1).clamp_min(1)  # (B,) token means
    return per_sequence.sum() / num_sequences


def _sequence_sum(loss, mask, num_sequences, num_tokens, max_len):
    return masked_sum(loss, mask) / (num_sequences * max_len)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": _token_mean,
    "sequence_mean": _sequence_mean,
    "sequence_sum": _sequence_sum,
}
"""Aggregation modes by the name a config gives (`stages.<rl stage>.loss_aggregation`)."""


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, *, num_sequences: float | torch.Tensor,
              num_tokens: float | torch.Tensor, max_len: int) -> torch.Tensor:
    """This (micro-)batch's share of the minibatch loss under `mode` (see the module docstring).

    loss (B, T) per-token losses, mask (B, T) bool, True = a real response token (padding never counts,
    whatever value it holds); num_sequences and num_tokens: the whole minibatch's counts (over every
    micro-batch and rank, divided by the ranks where gradients are averaged); max_len: Dr. GRPO's
    constant (the response length limit). Returns a 0-dim tensor.
    """
    return AGGREGATIONS[mode](loss, mask.bool(), num_sequences, num_tokens, max_len)
