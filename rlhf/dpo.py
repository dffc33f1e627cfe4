"""DPO's implicit reward (Rafailov et al. 2023) from sequence logprobs: functions of a model and tensors.

A policy trained with DPO against a reference defines a reward of its own, r(x, y) = beta * (log pi(y|x)
- log pi_ref(y|x)), up to a term of the prompt alone that cancels between two responses to one prompt.
So on a held-out pair, "the policy prefers chosen" means r(chosen) > r(rejected), and r(chosen) -
r(rejected) is its margin: the numbers TRL logs as rewards/accuracies and rewards/margins, here for a
whole held-out set rather than averaged over batches.

Batches are laid out as TRL's preference collator makes them: 2B right-padded rows, the B chosen
sequences (prompt + response) first and the B rejected ones after them, `completion_mask` True on the
response tokens.
"""

from __future__ import annotations

import torch

from rlhf.ppo.core import logprobs_from_logits


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) of each row (2B,): the summed logprobs of its completion tokens.

    input_ids, attention_mask, completion_mask: (2B, T); the logits at column t predict token t + 1.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]  # (2B, T-1, V)
    token_logps = logprobs_from_logits(logits, input_ids[:, 1:])  # (2B, T-1)
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (log pi - log pi_ref), elementwise (any shape)."""
    return beta * (logps - ref_logps)


def pair_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """`accuracy`: share of pairs whose chosen response gets the strictly higher reward (a tie counts as
    wrong, as in TRL); `margin`: mean of r(chosen) - r(rejected). Inputs (N,) each."""
    return {"accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "margin": (chosen_rewards - rejected_rewards).mean().item()}
