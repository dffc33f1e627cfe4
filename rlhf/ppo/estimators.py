"""Advantage estimators of the RL stages: GAE (PPO) and the critic-free ones (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Each takes the per-token rewards of a rollout batch (the KL penalty on the response tokens, the score at
the episode's end: `compute_rewards`) and returns per-token advantages (and the value model's targets
where it has one). They differ in the baseline that turns a return into an advantage:

    gae                     a learned value model, bootstrapped per token (Schulman et al. 2016)
    grpo                    the group's mean return, divided by the group's std (Shao et al. 2024)
    grpo_batch_std          the group's mean return, divided by the whole batch's std (TRL's scale_rewards="batch")
    dr_grpo                 the group's mean return, no std division (Liu et al. 2025, "Dr. GRPO")
    rloo                    the mean return of the group's other K - 1 responses (Ahmadian et al. 2024)
    reinforce_pp            none: token returns-to-go whitened over the whole batch (Hu 2025, REINFORCE++)
    reinforce_pp_baseline   the score's group mean first, then the same (REINFORCE++-baseline)

A group is the K = `group_size` responses to one prompt, consecutive rows of the batch (rows
k*K .. k*K + K - 1). Sequence-level estimators give every response token of a sequence the same
advantage. Everything here is pure tensor arithmetic; `whiten` is passed in so that the stage can
whiten over all processes' rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from rlhf.ppo.core import gae, last_token_index, masked_sum, masked_whiten

__all__ = ["ESTIMATORS", "Estimator", "group_mean_baseline", "group_std", "leave_one_out_baseline",
           "returns_to_go", "sequence_returns"]

Whiten = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- pure functions ------------------------------------------------------------------------------------


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / K, K): row k holds the K responses to prompt k."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"a batch of {x.shape[0]} responses does not split into groups of {group_size}")
    return x.view(-1, group_size)


def sequence_returns(rewards: torch.Tensor, episode_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's undiscounted return: its per-token rewards summed over the episode. (B, T) -> (B,)."""
    return masked_sum(rewards, episode_mask, dim=1)


def group_mean_baseline(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """returns (B,) minus the mean return of each one's group: r_i - mean_g(r). (B,)"""
    g = _groups(returns, group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def group_std(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each response's group's standard deviation of returns (unbiased, as `torch.std`): (B,).

    A group of one has no spread: its std is 0 (not NaN), so its advantage stays 0 after dividing.
    """
    g = _groups(returns, group_size)
    std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return std.expand_as(g).reshape(-1)


def leave_one_out_baseline(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """returns (B,) minus the mean of the other K - 1 returns of the group: r_i - (sum_g - r_i) / (K - 1).

    Equal to K / (K - 1) * (r_i - mean_g): an unbiased baseline, since it does not depend on r_i. (B,)
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 responses per prompt (samples_per_prompt >= 2)")
    g = _groups(returns, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def returns_to_go(rewards: torch.Tensor, episode_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the episode's positions; 0 elsewhere. (B, T) -> (B, T)."""
    episode_mask = episode_mask.bool()
    rewards = torch.where(episode_mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(episode_mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): every response token of a sequence gets its sequence's value; 0 off the response."""
    return torch.where(response_mask.bool(), per_sequence.unsqueeze(1), 0.0)


# ---- the estimators, one interchangeable object each -----------------------------------------------------


class Estimator:
    """Turns a batch's per-token rewards into per-token advantages.

    `__call__(rewards, scores, episode_mask, response_mask, values, group_size, whiten)` returns
    (advantages (B, T) on the response tokens, value targets (B, T) or None). `scores` (B,) are the
    sequences' scores alone (already inside `rewards`, at the episode's end). `needs_values`: whether the
    stage must build, train and save a value model for it; `min_group_size`: the fewest responses per
    prompt it works with.
    """

    needs_values: ClassVar[bool] = False
    min_group_size: ClassVar[int] = 1
    whitening_distorts: ClassVar[bool] = False
    """Whether whitening its advantages over the batch afterwards (`whiten_advantages`) changes what they
    mean: a token-weighted mean taken off group-centred advantages, Dr. GRPO's unscaled ones rescaled.
    The stage config refuses the two together."""
    reads_raw_scores: ClassVar[bool] = False
    """Whether it subtracts a statistic of `scores` from `rewards`, which must then hold the scores unscaled:
    the stage config refuses `whiten_rewards` with it."""

    def __call__(self, rewards: torch.Tensor, scores: torch.Tensor, episode_mask: torch.Tensor,
                 response_mask: torch.Tensor, values: torch.Tensor | None, group_size: int,
                 whiten: Whiten = masked_whiten, gamma: float = 1.0,
                 lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class GAE(Estimator):
    """PPO's: generalised advantage estimation against the value model (returns are its targets)."""

    needs_values = True

    def __call__(self, rewards, scores, episode_mask, response_mask, values, group_size, whiten=masked_whiten,
                 gamma=1.0, lam=0.95):
        return gae(rewards, values, episode_mask, gamma, lam)


class GroupNormalised(Estimator):
    """GRPO (`scale="group"`): (R_i - mean_g) / (std_g + eps); Dr. GRPO (`scale=None`): R_i - mean_g;
    `scale="batch"`: (R_i - mean_g) / std over the whole batch (all processes' rows), TRL's
    `scale_rewards="batch"`.

    Dividing by the group's std weighs prompts whose responses all score alike (too easy or too hard)
    as much as the others, and is the "difficulty bias" Dr. GRPO removes. With the KL in the reward
    (`kl_penalty: reward`), R_i is the score plus the sequence's KL penalty: a group whose scores tie has
    a std of KL noise alone, and dividing by it blows that noise up to unit scale (advantages of order 1
    from nothing but KL). GRPO's default puts the KL in the loss, where R_i is the score; with the KL in
    the reward prefer `dr_grpo` or `grpo_batch_std`, whose divisor does not shrink with one group.
    """

    min_group_size = 2
    whitening_distorts = True

    def __init__(self, scale: str | None, eps: float = 1e-6):
        if scale not in ("group", "batch", None):
            raise ValueError(f"scale must be 'group', 'batch' or None, got {scale!r}")
        self.scale, self.eps = scale, eps

    def __call__(self, rewards, scores, episode_mask, response_mask, values, group_size, whiten=masked_whiten,
                 gamma=1.0, lam=0.95):
        returns = sequence_returns(rewards, episode_mask)  # (B,)
        if self.scale == "batch":
            # whitening over the batch gives (R_i - mean_batch) / std_batch; its group means come off next,
            # leaving (R_i - mean_g) / std_batch, with `whiten`'s all-reduce over processes
            every = torch.ones_like(returns, dtype=torch.bool).unsqueeze(1)  # (B, 1)
            returns = whiten(returns.unsqueeze(1), every).squeeze(1)
        advantages = group_mean_baseline(returns, group_size)
        if self.scale == "group":
            advantages = advantages / (group_std(returns, group_size) + self.eps)
        return _broadcast(advantages, response_mask), None


class LeaveOneOut(Estimator):
    """RLOO: R_i minus the mean return of the other responses to the same prompt."""

    min_group_size = 2
    whitening_distorts = True

    def __call__(self, rewards, scores, episode_mask, response_mask, values, group_size, whiten=masked_whiten,
                 gamma=1.0, lam=0.95):
        returns = sequence_returns(rewards, episode_mask)
        return _broadcast(leave_one_out_baseline(returns, group_size), response_mask), None


class ReinforcePP(Estimator):
    """REINFORCE++: per-token returns-to-go of the KL-penalised rewards, whitened over the global batch.

    With `group_baseline`, each sequence's score first has its group's mean score taken off, at the
    episode's last position where the score sits (REINFORCE++-baseline, as OpenRLHF does it). The mean
    is of `scores` as given, so `rewards` must hold them unscaled: the stage config refuses
    `whiten_rewards` with it (whitened rewards hold the score rescaled and shifted, and the raw group
    mean would no longer cancel it).
    """

    def __init__(self, group_baseline: bool):
        self.group_baseline = group_baseline
        self.min_group_size = 2 if group_baseline else 1
        self.reads_raw_scores = group_baseline

    def __call__(self, rewards, scores, episode_mask, response_mask, values, group_size, whiten=masked_whiten,
                 gamma=1.0, lam=0.95):
        if self.group_baseline:
            group_means = scores - group_mean_baseline(scores, group_size)  # (B,)
            last = last_token_index(episode_mask)  # (B,) where the score sits
            rewards = rewards.scatter_add(1, last.unsqueeze(1), -group_means.unsqueeze(1).to(rewards.dtype))
        advantages = returns_to_go(rewards, episode_mask, gamma)
        advantages = torch.where(response_mask.bool(), advantages, 0.0)
        return whiten(advantages, response_mask), None


ESTIMATORS: dict[str, Estimator] = {
    "gae": GAE(),
    "grpo": GroupNormalised(scale="group"),
    "grpo_batch_std": GroupNormalised(scale="batch"),
    "dr_grpo": GroupNormalised(scale=None),
    "rloo": LeaveOneOut(),
    "reinforce_pp": ReinforcePP(group_baseline=False),
    "reinforce_pp_baseline": ReinforcePP(group_baseline=True),
}
"""Estimators by the name a config gives (`stages.<rl stage>.estimator`)."""
