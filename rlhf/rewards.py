"""Rewards from anything: reward models and Python functions, summed with weights.

An RL stage's `rewards:` maps sources to weights:

    rewards: {reward: 1.0, my_rewards:uses_word: 0.5, word_vader: 0.2}

A source is a *function* when it is a built-in judge name (rlhf/judges.py) or a dotted path
`package.module:function`; it is called as `fn(prompts, responses, **columns) -> list[float]`, where
`columns` are the prompt rows' other fields (a checkable task ships its answers in the prompts file:
`{"prompt": ..., "answer": ...}` gives `answer=[...]`). Anything else is a *reward model*: an upstream
stage's artifact, a hub id or a local directory, scored at the response's last real token (the EOS).
A function that raises, returns the wrong count, NaN or a non-number stops the stage with an error
naming the function and the row (`rlhf.judges.load_judge` checks every call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def is_function(spec: str) -> bool:
    """Whether a `rewards:` key names a function (a built-in judge or `module:function`) or a model."""
    from rlhf.judges import BUILTIN_JUDGES

    return spec in BUILTIN_JUDGES or ":" in spec


def model_sources(rewards: dict[str, float]) -> list[str]:
    """The `rewards:` keys that name reward models, in order."""
    return [name for name in rewards if not is_function(name)]


@dataclass
class RewardSource:
    """One weighted term of the reward."""

    name: str
    """The `rewards:` key: a function spec or a model reference."""
    weight: float
    """Its weight in the sum."""
    judge: Any = None
    """The checked function (`load_judge`) for a function source."""
    model: Any = None
    """The reward model (AutoModelForSequenceClassification) for a model source."""
    mean: float = 0.0
    """Subtracted from the model's raw score before weighting (its manifest's reward mean, if normalised)."""
    std: float = 1.0
    """The model's raw score is divided by it (its manifest's reward std, if normalised)."""


@dataclass
class Rewards:
    """The stage's reward: sum over sources of weight x (score - mean) / std, per response."""

    sources: list[RewardSource] = field(default_factory=list)

    @property
    def models(self) -> list[RewardSource]:
        return [s for s in self.sources if s.model is not None]

    def score(self, score_model, query_ids, query_mask, response_ids, response_mask, prompts: list[str],
              responses: list[str], columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total (B,), raw total (B,), per-source raw scores (B, S)) of one rollout batch.

        `score_model(model, query_ids, query_mask, response_ids, response_mask)` reads a reward model's
        score at the last real token (the stage passes its packed or padded forward). Functions see the
        decoded `responses` with their `prompts` and the prompt rows' `columns`. The raw total sums
        weight x raw score; the total uses each model's normalisation.
        """
        device = response_ids.device
        raw, total, raw_total = [], torch.zeros(len(responses), device=device), torch.zeros(len(responses), device=device)
        for s in self.sources:
            if s.model is not None:
                values = score_model(s.model, query_ids, query_mask, response_ids, response_mask).float()
            else:
                values = torch.tensor(s.judge(prompts, responses, **columns), dtype=torch.float32, device=device)
            raw.append(values)
            raw_total += s.weight * values
            total += s.weight * (values - s.mean) / s.std
        return total, raw_total, torch.stack(raw, dim=1)
