"""PPO for RLHF: the math (`core`), the losses (`losses`: PPO with DAPO's clip-higher, GSPO, CISPO),
the training-inference mismatch correction (`correction`), DAPO's group filter (`sampling_filters`) and
KL-coefficient controllers (`kl`).

Everything here is pure tensor arithmetic with plain-float hyperparameters; the training loop that
generates rollouts and calls these lives elsewhere.
"""

from rlhf.ppo.core import (
    apply_no_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    has_eos,
    kl_k1,
    kl_k3,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask_from_eos,
    with_state_after_eos,
)
from rlhf.ppo.correction import importance_weights
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController
from rlhf.ppo.losses import cispo_policy_loss, gspo_policy_loss, policy_loss, value_loss
from rlhf.ppo.sampling_filters import groups_with_signal

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "apply_no_eos_penalty",
    "cispo_policy_loss",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "groups_with_signal",
    "gspo_policy_loss",
    "has_eos",
    "importance_weights",
    "kl_k1",
    "kl_k3",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask_from_eos",
    "value_loss",
    "with_state_after_eos",
]
