"""Rewards from anything: reward models and Python functions, summed with weights.

An RL stage's `rewards:` maps sources to weights:

    rewards: {reward: 1.0, my_rewards:has_answer: 0.5, fluency: 0.2}

A source is a *function* when it is a judge's name (a built-in or a registered one, rlhf/judges.py) or a
dotted path `package.module:function`; it is called as `fn(prompts, responses, **columns) -> list[float]`, where
`columns` are the prompt rows' other fields (a checkable task ships its answers in the prompts file:
`{"prompt": ..., "answer": ...}` gives `answer=[...]`). Anything else is a *reward model*: an upstream
stage's artifact, a hub id or a local directory, scored at the response's last real token (the EOS).
A function that raises, returns anything but a sequence of finite real numbers, one per response (a
string, a dict, None, a number as text), or a reward model that scores NaN or infinity stops the stage
with an error naming the function or model, the row, its prompt and its response (`load_reward_function`,
`Rewards.score`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def is_function(spec: str) -> bool:
    """Whether a `rewards:` key names a function (a judge's name or `module:function`) or a model."""
    from rlhf.judges import judge_names

    return spec in judge_names() or ":" in spec


def model_sources(rewards: dict[str, float]) -> list[str]:
    """The `rewards:` keys that name reward models, in order."""
    return [name for name in rewards if not is_function(name)]


def load_reward_function(spec: str, field: str) -> Callable[..., list[float]]:
    """The reward function `spec` names (a judge's name or `package.module:function`), set at `field`.

    Called as `fn(prompts, responses, **columns)`, it hands the function the prompt columns its signature
    takes and checks what it returns with `checked_scores`. When the function raises, each row is tried
    alone, so that the error names the row it fails on.
    """
    from rlhf.judges import _accepted_columns, checked_scores, load_judge

    # load_judge imports the function (or instantiates the class) and names what is wrong with `spec`; the
    # function it wraps is called here, so that errors name a reward function and a raising one its row.
    judge = load_judge(spec, field)
    fn = getattr(judge, "__wrapped__", judge)
    take = _accepted_columns(fn)
    where = f"{field}: reward function {spec!r}"

    def call(prompts, responses, **columns):
        return fn(list(prompts), list(responses), **take(columns))

    def reward(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        for name, values in columns.items():
            if len(values) != len(responses):
                raise ValueError(f"{where}: column {name!r} has {len(values)} values for {len(responses)} responses")
        try:
            out = call(prompts, responses, **columns)
        except Exception as e:
            for i in range(len(responses)):  # find the row it fails on
                try:
                    call(prompts[i : i + 1], responses[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
                except Exception as row_error:
                    raise ValueError(f"{where} raised on row {i} (prompt {prompts[i]!r}, response {responses[i]!r}): "
                                     f"{type(row_error).__name__}: {row_error}") from row_error
            raise ValueError(f"{where} failed on a batch of {len(responses)} responses (each row alone passes): "
                             f"{type(e).__name__}: {e}") from e
        return checked_scores(out, where, prompts, responses, what="reward functions")

    return reward


@dataclass
class RewardSource:
    """One weighted term of the reward."""

    name: str
    """The `rewards:` key: a function spec or a model reference."""
    weight: float
    """Its weight in the sum."""
    judge: Any = None
    """The checked function (`load_reward_function`) for a function source."""
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

    @classmethod
    def build(cls, weights: dict[str, float], models: dict[str, Any], stats: Callable[[str], dict], *,
              normalize: bool, field: str) -> Rewards:
        """The sources of a stage's `rewards:` (`weights`, by spec): each function loaded and its every call
        checked (`load_reward_function`, errors naming `field`), each model from `models` with, when
        `normalize`, the reward mean and std of its manifest's metrics (`stats(name)`)."""
        sources = []
        for name, weight in weights.items():
            if is_function(name):
                sources.append(RewardSource(name, weight, judge=load_reward_function(name, field)))
                continue
            m = stats(name) if normalize else {}
            mean, std = m.get("reward_mean", 0.0), m.get("reward_std", 1.0)
            sources.append(RewardSource(name, weight, model=models[name], mean=mean, std=std or 1.0))
        return cls(sources)

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

        `score_model` is the stage's forward and may return anything; a score that is NaN or infinite stops
        the stage here, naming the model and the row, before it poisons every advantage.
        """
        device = response_ids.device
        raw, total, raw_total = [], torch.zeros(len(responses), device=device), torch.zeros(len(responses), device=device)
        for s in self.sources:
            if s.model is not None:
                values = score_model(s.model, query_ids, query_mask, response_ids, response_mask).float()
                bad = (~torch.isfinite(values)).nonzero()
                if len(bad):
                    i = int(bad[0])
                    raise ValueError(f"reward model {s.name!r} scored row {i} (prompt {prompts[i]!r}, response "
                                     f"{responses[i]!r}) as {values[i].item()}; its weights or inputs are broken "
                                     "(a NaN in the checkpoint, an overflow in half precision): check the model, or "
                                     "run it in float32")
            else:
                values = torch.tensor(s.judge(prompts, responses, **columns), dtype=torch.float32, device=device)
            raw.append(values)
            raw_total += s.weight * values
            total += s.weight * (values - s.mean) / s.std
        return total, raw_total, torch.stack(raw, dim=1)
