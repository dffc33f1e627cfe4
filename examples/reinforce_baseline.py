"""A worked PPO subclass: replace GAE with a REINFORCE-style advantage and a choice of baseline.

Point an experiment at it from YAML:

    stages:
      ppo:
        class: examples.reinforce_baseline:ReinforceBaselinePPO
        baseline: batch_mean        # or: value (the value model's estimate at the first response token)

Only `compute_advantages` changes; rollout, scoring, the KL-penalised rewards, the clipped update,
logging, resume and the watchdogs are inherited unchanged. The batch mean and the whitening use every
process's rows under `accelerate launch` (`self.launch`), as the built-in estimators do; the built-in
`estimator: reinforce_pp` (rlhf/ppo/estimators.py) is REINFORCE++ without a value model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.schema import checked
from rlhf.ppo import masked_sum
from stages.ppo import PPOConfig, PPOStage


@dataclass
class ReinforceBaselineConfig(PPOConfig):
    baseline: str = checked("batch_mean", choices=("batch_mean", "value"))
    """What is subtracted from each sequence's return: batch_mean or value."""


def sequence_advantages(rewards: torch.Tensor, episode_mask: torch.Tensor, response_mask: torch.Tensor,
                        baseline: torch.Tensor) -> torch.Tensor:
    """Every response token of a sequence gets that sequence's total reward minus its baseline.

    rewards (B, R); episode_mask (B, R) bool, the positions whose rewards count (the response, and the
    state after EOS where the stage puts the score there: `PPOStage.episode_mask`); response_mask
    (B, R) bool, the tokens that get an advantage; baseline (B,). Returns (B, R), zero off the response.
    """
    returns = masked_sum(rewards, episode_mask, dim=1)  # (B,)
    return torch.where(response_mask, (returns - baseline).unsqueeze(1), 0.0)


class ReinforceBaselinePPO(PPOStage):
    """PPO's clipped update driven by REINFORCE advantages with a batch-mean or value baseline."""

    config_class = ReinforceBaselineConfig

    def compute_advantages(self, rewards, traj):
        # the episode: the response, and the state after EOS that holds the score with score_after_eos
        episode = traj.episode_mask
        returns_per_seq = masked_sum(rewards, episode, dim=1)  # (B,)
        if self.config.baseline == "batch_mean":  # over every process's rows, not only this one's
            baseline = torch.full_like(returns_per_seq, self.launch.batch_mean(returns_per_seq))
        else:
            baseline = traj.values[:, 0]
        advantages = sequence_advantages(rewards, episode, traj.response_mask, baseline)
        if self.config.whiten_advantages:
            advantages = self.launch.whiten(advantages, traj.response_mask)
        # The value model still learns to predict the per-sequence return at every token.
        value_targets = torch.where(episode, returns_per_seq.unsqueeze(1), 0.0)
        return advantages, value_targets
