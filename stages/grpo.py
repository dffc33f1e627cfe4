"""GRPO: the RL stage's loop with group-relative advantages and no value model (Shao et al. 2024).

The same loop as `stages/ppo.py` (rollout, score, rewards, advantages, clipped update, watchdogs,
evaluation), with GRPO's defaults: K responses per prompt, each response's advantage its return against
its group's mean and std, the KL to the reference as a loss term (the clamped k3 estimate), sequence-mean
loss aggregation, one update per rollout. Only the defaults differ, so `estimator:` switches this stage
to Dr. GRPO, RLOO or REINFORCE++ (rlhf/ppo/estimators.py), and `stages.ppo` runs GRPO with the same
settings.

    stages:
      grpo:
        policy: sft
        rewards: {reward: 1.0, uses_word: 0.5}    # reward models and functions, weighted
        samples_per_prompt: 8
        estimator: grpo                          # grpo | dr_grpo | rloo | reinforce_pp | gae
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.schema import checked
from rlhf.ppo.aggregation import AGGREGATIONS
from rlhf.ppo.estimators import ESTIMATORS
from stages.ppo import PPOStage
from stages.ppo_config import KL_PLACEMENTS, PPOConfig


@dataclass
class GRPOConfig(PPOConfig):
    """PPOConfig with GRPO's defaults (see the fields' docstrings in stages/ppo.py)."""

    estimator: str = checked("grpo", choices=tuple(ESTIMATORS))
    samples_per_prompt: int = checked(8, ge=1)
    loss_aggregation: str = checked("sequence_mean", choices=tuple(AGGREGATIONS))
    kl_penalty: str = checked("loss", choices=KL_PLACEMENTS)
    kl_coef: float = checked(0.04, ge=0)
    rollout_batch_size: int = checked(64, ge=1)
    num_minibatches: int = checked(2, ge=1)
    ppo_epochs: int = checked(1, ge=1)
    whiten_advantages: bool = False
    score_after_eos: bool = False
    learning_rate: float = checked(1e-4, gt=0)
    min_unique_share: float | None = checked(0.25, ge=0, le=1)


class GRPOStage(PPOStage):
    """GRPO: group-relative advantages, KL in the loss, no value model."""

    name = "grpo"
    config_class = GRPOConfig
