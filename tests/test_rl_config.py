"""The RL stages' settings that do not go together are refused when the experiment loads (plan time),
with a message naming the YAML key and what to set instead."""

from __future__ import annotations

import pytest
from conftest import write_config

from rlhf.config import ConfigError, load_experiment
from stages.grpo import GRPOConfig
from stages.ppo_config import PPOConfig


def refused(workdir, stage: str, block: dict, match: str) -> None:
    path = write_config(workdir / "e.yaml", {"stages": {stage: block}})
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_reinforce_pp_baseline_with_whitened_rewards_is_refused(workdir):
    # The group mean of the raw scores was taken off rewards that whitening had rescaled and shifted: two
    # prompts, one-token responses scored 0, 1 | 10, 11, KL 0 gave advantages 0.848, 0.884, -0.884, -0.848
    # (the worse answer to the first prompt pushed up) instead of -0.866, 0.866, -0.866, 0.866.
    block = {"estimator": "reinforce_pp_baseline", "samples_per_prompt": 2, "whiten_rewards": True}
    refused(workdir, "ppo", block,
            r"e\.yaml: stages\.ppo\.whiten_rewards: .*reinforce_pp_baseline.*set whiten_rewards: false")
    PPOConfig(estimator="reinforce_pp_baseline", samples_per_prompt=2)  # without it: fine
    PPOConfig(estimator="reinforce_pp", whiten_rewards=True)  # no group mean to get wrong
    PPOConfig(whiten_rewards=True)  # GAE


def test_adaptive_kl_from_zero_is_refused(workdir):
    # the controller multiplies the coefficient: from 0 it stays 0, with a reference loaded for nothing
    refused(workdir, "ppo", {"adaptive_kl": True, "kl_coef": 0}, r"e\.yaml: stages\.ppo\.kl_coef: 0 with adaptive_kl")
    PPOConfig(adaptive_kl=True, kl_coef=0.1)
    PPOConfig(kl_coef=0)


@pytest.mark.parametrize("estimator", ["grpo", "grpo_batch_std", "dr_grpo", "rloo"])
def test_group_estimators_refuse_advantage_whitening(workdir, estimator):
    # stages.ppo whitens advantages by default; over GRPO's or RLOO's it takes a token-weighted batch mean
    # off group-centred advantages, and it rescales Dr. GRPO's, which are deliberately not divided by a std
    block = {"estimator": estimator, "samples_per_prompt": 2}
    refused(workdir, "ppo", block, rf"e\.yaml: stages\.ppo\.whiten_advantages: .*{estimator}.*"
                                   r"set whiten_advantages: false")
    PPOConfig(estimator=estimator, samples_per_prompt=2, whiten_advantages=False)
    GRPOConfig(estimator=estimator)  # GRPO's defaults do not whiten


def test_every_estimator_is_accepted_somewhere():
    from rlhf.ppo.estimators import ESTIMATORS

    for name, est in ESTIMATORS.items():
        PPOConfig(estimator=name, samples_per_prompt=est.min_group_size, rollout_batch_size=64,
                  whiten_advantages=not est.whitening_distorts)
