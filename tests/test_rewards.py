"""What a reward function and a reward model may return to an RL stage: one finite real number per
response. Anything else stops the stage with an error naming the function (or reward model), the row,
its prompt and its response."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf.rewards import RewardSource, Rewards
from stages.ppo import PPOStage
from stages.ppo_config import PPOConfig

PROMPTS = [f"Use the word \"{w}\" in a sentence." for w in ("cat", "dog", "sun")]
CAT, DOG = r"'Use the word \"cat\" in a sentence.'", r"'Use the word \"dog\" in a sentence.'"
RESPONSES = ["A cat sat.", "The dog ran.", "Sun."]


def strings(prompts, responses):
    return [str(len(r)) for r in responses]


def one_string(prompts, responses):
    return "123"  # a str is a sequence of characters: once read as the scores 1, 2, 3


def a_dict(prompts, responses):
    return {i: 1.0 for i in range(len(responses))}


def nothing(prompts, responses):
    return None


def a_none(prompts, responses):
    return [1.0, None, 0.0]


def raises_on_dog(prompts, responses):
    return [1 / ("dog" not in r) for r in responses]  # ZeroDivisionError on row 1 only


def too_few(prompts, responses):
    return [1.0]


def fine(prompts, responses):
    return np.array([0.5, 1, True]) if len(responses) == 3 else [0.5] * len(responses)


def tensor_scores(prompts, responses):
    return torch.tensor([0.5, 1.0, 2.0])


def score(spec: str) -> torch.Tensor:
    """The stage's reward of RESPONSES from the function `spec` alone, built as the stage builds it."""
    stub = SimpleNamespace(config=PPOConfig(rewards={spec: 1.0}), stage_name="ppo")
    rewards = PPOStage.build_rewards(stub, {})
    ids = torch.zeros(3, 2, dtype=torch.long)
    return rewards.score(None, ids, ids.bool(), ids, ids.bool(), PROMPTS, RESPONSES, {})[0]


@pytest.mark.parametrize("fn,message", [
    ("strings", rf"scored row 0 \(prompt {CAT}, response 'A cat sat.'\) as '10', a str"),
    ("one_string", r"returned a str \('123'\), not a list of numbers"),
    ("a_dict", r"returned a dict, not a list of numbers"),
    ("nothing", r"returned None, not a list of numbers"),
    ("a_none", rf"scored row 1 \(prompt {DOG}, response 'The dog ran.'\) as None"),
    ("raises_on_dog", rf"raised on row 1 \(prompt {DOG}, response 'The dog ran.'\): "
                      r"ZeroDivisionError"),
    ("too_few", r"returned 1 scores for 3 responses"),
])
def test_a_reward_function_returning_anything_but_numbers_is_refused(fn, message):
    with pytest.raises(ValueError, match=rf"stages\.ppo\.rewards: reward function 'test_rewards:{fn}' {message}"):
        score(f"test_rewards:{fn}")


def test_numbers_of_any_kind_are_accepted():
    assert score("test_rewards:fine").tolist() == [0.5, 1.0, 1.0]  # numpy, ints and bools are numbers
    assert score("test_rewards:tensor_scores").tolist() == [0.5, 1.0, 2.0]
    assert score("uses_word").shape == (3,)  # a registered judge (tasks/words.py), with its columns


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_reward_model_score_stops_the_stage_naming_the_row(bad):
    rewards = Rewards([RewardSource("reward", 1.0, model=object())])
    ids = torch.zeros(3, 2, dtype=torch.long)

    def score_model(model, *tensors):
        return torch.tensor([0.5, bad, 1.0])

    with pytest.raises(ValueError, match=rf"reward model 'reward' scored row 1 \(prompt {DOG}, "
                                         rf"response 'The dog ran.'\) as {bad}"):
        rewards.score(score_model, ids, ids.bool(), ids, ids.bool(), PROMPTS, RESPONSES, {})


def test_the_plan_refuses_a_reward_function_that_returns_text(workdir, tiny_data):
    from conftest import ppo_config, write_config

    from rlhf.config import ConfigError, load_experiment
    from rlhf.pipeline import Pipeline

    cfg = ppo_config(tiny_data, str(workdir / "store"), rewards={"test_rewards:strings": 1.0})
    stage = Pipeline(load_experiment(write_config(workdir / "e.yaml", cfg))).stages["ppo"]
    # the judge check of the plan sees it first (every judge's output goes through `checked_scores`)
    with pytest.raises(ConfigError, match=r"e\.yaml: stages\.ppo\.rewards: judge 'test_rewards:strings' "
                                          r"scored row 0 .* as '15', a str; .* before anything ran"):
        stage.check()
