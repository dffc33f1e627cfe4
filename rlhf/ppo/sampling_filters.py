"""Filters on sampled groups before the update: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476).

Group-relative estimators (GRPO, Dr. GRPO, RLOO: rlhf/ppo/estimators.py) subtract a group baseline from each
response's score, so a group whose K responses all scored the same (every answer right, or every answer
wrong) gets advantage 0 on every token and contributes no gradient, only a smaller effective batch. DAPO
drops such groups and samples more prompts until the batch is full; `groups_with_signal` says which to keep.
A group is K = `group_size` consecutive rows, as in rlhf/ppo/estimators.py.
"""

from __future__ import annotations

import torch

__all__ = ["groups_with_signal"]


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool (B // K,): True where a group's K scores are not all equal, so its advantages are not all 0.

    scores (B,): one score per response, groups of K = group_size consecutive rows. Equality is exact,
    which suits verifiable rewards (0 / 1); veRL's DAPO recipe keeps a group when np.std of its metric is
    > 0 (the same test; volcengine/verl docs/algo/dapo.md line 84), and also keeps groups of one, which
    here have no signal (a group of one is its own baseline). A NaN score counts as different.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), one per response, got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"group_size: a batch of {scores.shape[0]} scores does not split into groups of {group_size}")
    groups = scores.view(-1, group_size)  # (B // K, K)
    return (groups != groups[:, :1]).any(dim=1)
