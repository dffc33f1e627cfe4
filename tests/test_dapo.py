"""DAPO (stages/dapo.py): GRPO's loop whose batches keep the groups whose rewards differ, topped up from
more rollouts; and rlhf.rollout.cat_trajectories, which stacks the rollouts it draws from."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import small_rl_run
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.ppo.sampling_filters import groups_with_signal
from rlhf.rollout import Trajectory, cat_trajectories


def parity(prompts, responses):
    """A reward on which about half of the groups of two responses tie."""
    return [float(len(r.split()) % 2) for r in responses]


def test_cat_trajectories_pads_prompts_left_and_responses_right():
    def traj(p, r, token):
        b = 2
        return Trajectory(torch.full((b, p), token), torch.ones(b, p, dtype=torch.bool), torch.full((b, r), token),
                          torch.ones(b, r, dtype=torch.bool), torch.full((b, r), -1.0), None, None,
                          torch.tensor([1.0, 2.0]) * token, torch.zeros(b), torch.ones(b, dtype=torch.bool),
                          torch.ones(b, r, dtype=torch.bool), torch.full((b, 1), float(token)), None)

    out = cat_trajectories([traj(1, 3, 7), traj(2, 1, 8)], pad_token_id=0)
    assert out.query_ids.tolist() == [[0, 7], [0, 7], [8, 8], [8, 8]]  # left padding keeps prompts at the end
    assert out.query_mask.tolist() == [[False, True]] * 2 + [[True, True]] * 2
    assert out.response_ids.tolist() == [[7, 7, 7], [7, 7, 7], [8, 0, 0], [8, 0, 0]]
    assert out.response_mask.tolist() == [[True] * 3] * 2 + [[True, False, False]] * 2
    assert out.logprobs.tolist() == [[-1.0] * 3] * 2 + [[-1.0, 0.0, 0.0]] * 2
    assert out.scores.tolist() == [7.0, 14.0, 8.0, 16.0] and out.source_scores.shape == (4, 1)
    assert out.ref_logprobs is None and out.token_weights is None


@pytest.fixture(scope="module")
def upstream(ppo_upstream):
    return ppo_upstream


def dapo(upstream, *overrides):
    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    return [*small_rl_run("dapo", prompts, samples_per_prompt=2, no_eos_score="null",
                          rewards="{test_dapo:parity: 1.0}"), *overrides]


def test_a_batch_keeps_groups_with_a_signal_and_tops_up_from_more_rollouts(upstream):
    stage = Pipeline(load_experiment(upstream, dapo(upstream, "stages.dapo.max_sampling_rounds=6"))).stages[
        "dapo"].open(tracking=False)
    torch.manual_seed(0)
    first = super(type(stage), stage).make_trajectory(stage.prompts_for_step(0))
    tied = (~groups_with_signal(first.scores, 2)).sum()
    assert tied > 0  # the premise: the plain rollout has groups that train nothing
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    assert len(traj.scores) == 8 and stage.sampling_stats["env/sampling_rounds"] > 1
    assert groups_with_signal(traj.scores, 2).all()
    assert stage.sampling_stats["env/groups_with_signal"] == pytest.approx(1 - tied.item() / 4)
    for g in range(4):  # a group is one prompt's two responses
        assert torch.equal(traj.query_ids[2 * g], traj.query_ids[2 * g + 1])


def test_a_dapo_run_logs_its_groups_and_publishes_a_policy(upstream):
    pipe = Pipeline(load_experiment(upstream, dapo(upstream)))
    result = {r.name: r for r in pipe.run(until="dapo")}["dapo"]
    rows = [json.loads(line) for line in (pipe.store.local_dir(result.key) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "env/score" in r]
    assert len(rows) == 2 and all(1 <= r["env/sampling_rounds"] <= 3 for r in rows)
    assert "policy/kl_loss" not in rows[0]  # DAPO has no KL term
    assert result.metrics["train_steps"] == 2


def test_dapo_refuses_groups_of_one(upstream):
    with pytest.raises(Exception, match="dynamic sampling keeps groups whose rewards differ"):
        load_experiment(upstream, dapo(upstream, "stages.dapo.samples_per_prompt=1",
                                       "stages.dapo.estimator=reinforce_pp"))
