"""The worked PPO subclass in examples/: selected from YAML, its estimator checked by hand."""

from __future__ import annotations

import torch

from conftest import ppo_config, write_config
from examples.reinforce_baseline import ReinforceBaselinePPO, sequence_advantages
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline


def test_sequence_advantages_golden():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 0.0, 0.0], [-0.1, 2.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, False, False]])
    episode = mask.clone()
    episode[2, 1] = True  # row 2 ended in EOS at 0 and holds its score 2.0 on the state after it
    baseline = torch.tensor([0.4, 0.4, 0.4])
    # row 0: return 0.1 - 0.2 + 1.0 = 0.9 -> 0.9 - 0.4 = 0.5 on every real token
    # row 1: return 0.5 (padding rewards ignored) -> 0.1 on its one real token, 0 on padding
    # row 2: return -0.1 + 2.0 = 1.9 (7.0 past the episode ignored) -> 1.5 on its one token, not after EOS
    expected = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.0, 0.0], [1.5, 0.0, 0.0]])
    assert torch.allclose(sequence_advantages(rewards, episode, mask, baseline), expected, atol=1e-7)


def test_subclass_runs_from_yaml(workdir, tiny_data):
    cfg = ppo_config(tiny_data, str(workdir / "store"))
    cfg["stages"]["ppo"].update({"class": "examples.reinforce_baseline:ReinforceBaselinePPO", "baseline": "value"})
    path = write_config(workdir / "exp.yaml", cfg)
    pipe = Pipeline(load_experiment(path))
    stage = pipe.stages["ppo"]
    assert isinstance(stage, ReinforceBaselinePPO) and stage.config.baseline == "value"
    results = {r.name: r for r in pipe.run()}
    m = pipe.store.manifest(results["ppo"].key)
    assert m["class"] == "examples.reinforce_baseline:ReinforceBaselinePPO" and m["config"]["baseline"] == "value"
    assert results["ppo"].metrics["train_steps"] == 2
    # a different class is different work: the key differs from the plain PPO stage's
    plain = dict(cfg)
    plain["stages"] = {**cfg["stages"], "ppo": {k: v for k, v in cfg["stages"]["ppo"].items() if k not in ("class", "baseline")}}
    other = Pipeline(load_experiment(write_config(workdir / "plain.yaml", plain)))
    assert other.stages["ppo"].key != stage.key
