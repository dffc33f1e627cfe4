"""The critic-free RL stages on the one loop: groups, reward functions with prompt columns, no value model,
no reference at KL 0, exact gradient accumulation for every aggregation mode, resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import small_rl_run, write_jsonl
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError


def word_reward(prompts, responses, word):
    """A checkable reward reading the prompts file's "word" column: 1 when the response has the word's
    first letter (a tiny untrained policy gets it often enough to give groups a spread)."""
    return [float(w[0] in r) for r, w in zip(responses, word)]


def nan_reward(prompts, responses):
    return [float("nan")] * len(responses)


def raising_reward(prompts, responses, word):
    raise RuntimeError("the answer key is missing")


@pytest.fixture(scope="module")
def upstream(ppo_upstream):
    """The tiny experiment with pretrain -> sft -> reward built, and a prompts file with a "word" column."""
    rows = [json.loads(line) for line in open(load_experiment(ppo_upstream).stages["ppo"].config.prompts)]
    words = ["cat", "dog", "sun", "tree", "sky", "river", "stone", "bird"]
    path = write_jsonl(ppo_upstream.parent / "data" / "word_prompts.jsonl",
                       [{"prompt": r["prompt"], "word": words[i % len(words)]} for i, r in enumerate(rows)])
    return ppo_upstream, path


def grpo(upstream, *overrides):
    path, prompts = upstream
    return [*small_rl_run("grpo", prompts, save_every=1, rewards="{test_grpo:word_reward: 1.0, reward: 0.5}"),
            *overrides]


def open_stage(upstream, *overrides):
    return Pipeline(load_experiment(upstream[0], grpo(upstream, *overrides))).stages["grpo"].open(tracking=False)


def test_groups_are_consecutive_and_whole(upstream):
    stage = open_stage(upstream)
    rows = stage.prompts_for_step(0)
    assert len(rows) == 8 and rows[:4] == [rows[0]] * 4 and rows[4:] == [rows[4]] * 4 and rows[0] != rows[4]
    with pytest.raises(StageError, match=r"not a whole number of groups of stages\.grpo\.samples_per_prompt=3"):
        stage.launch.check_split("grpo", 8, 1, group_size=3)


def test_no_value_model_is_built_and_functions_see_the_prompt_columns(upstream, monkeypatch):
    import test_grpo

    seen = []
    original = test_grpo.word_reward
    monkeypatch.setattr(test_grpo, "word_reward", lambda p, r, word: seen.append(list(word)) or original(p, r, word))
    stage = open_stage(upstream)
    assert stage.value_model is None and stage.estimator.needs_values is False
    opt = getattr(stage.optimizer, "optimizer", stage.optimizer)
    assert len(opt.param_groups) == 1  # the policy's parameters alone
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    assert traj.values is None and traj.source_scores.shape == (8, 2)
    words = [stage.prompt_columns["word"][i] for i in stage.prompts_for_step(0)]
    assert seen[-1] == words  # each response scored with its own prompt row's word
    expected = torch.tensor(original(None, stage.decode(traj.response_ids, traj.response_mask), words))
    assert torch.equal(traj.source_scores[:, 0], expected)
    rewards, kl = stage.compute_rewards(traj)
    advantages, returns = stage.compute_advantages(rewards, traj)
    assert returns is None
    # group-relative: each group's advantages sum to zero
    seq = advantages[:, 0]
    assert torch.allclose(seq.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)


def test_kl_coefficient_zero_loads_no_reference_and_the_plan_says_so(upstream, capsys):
    from rlhf.cli import main

    stage = open_stage(upstream, "stages.grpo.kl_coef=0")
    assert stage.reference is None and not stage.config.uses_reference
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    assert traj.ref_logprobs is None and (stage.kl(traj) == 0).all()
    path = upstream[0]
    assert main(["plan", str(path), "--memory", "--until", "grpo", *grpo(upstream, "stages.grpo.kl_coef=0")]) == 0
    out = capsys.readouterr().out
    assert "value weights" not in out and "reference (frozen)" not in out and "reward model (frozen)" in out
    assert main(["plan", str(path), "--memory", "--until", "grpo", *grpo(upstream, "stages.grpo.estimator=gae",
                                                                         "stages.grpo.samples_per_prompt=1")]) == 0
    out = capsys.readouterr().out
    assert "value weights" in out and "reference (frozen)" in out


def _gradients(stage, traj, advantages, returns):
    grads = {}

    def capture():
        for name, p in stage.policy.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    stage.optimizer.step = capture  # look at the accumulated gradient instead of stepping
    torch.manual_seed(3)
    stage.update(traj, advantages, returns)
    return grads


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum"])
def test_gradient_accumulation_equals_the_full_minibatch_in_every_mode(upstream, mode):
    common = ["stages.grpo.num_minibatches=1", "stages.grpo.max_grad_norm=1e9", f"stages.grpo.loss_aggregation={mode}",
              "stages.grpo.kl_coef=0.1"]
    full = open_stage(upstream, *common, "stages.grpo.gradient_accumulation_steps=1")
    accum = open_stage(upstream, *common, "stages.grpo.gradient_accumulation_steps=4")
    torch.manual_seed(0)
    traj = full.make_trajectory(full.prompts_for_step(0))
    # rows of different lengths, so micro-batches hold different token counts
    lengths = torch.arange(8) % traj.response_ids.shape[1] + 1
    mask = torch.arange(traj.response_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    # Scores that differ within each group: the untrained policy rarely ends in EOS, so every row would get
    # the no-EOS score -1, every advantage would be 0 and the test would compare a zero gradient with zero.
    scores = torch.tensor([0.0, 1.0, 3.0, -1.0, 2.0, 2.0, 0.5, -2.0])
    traj = traj._replace(response_mask=mask, episode_mask=full.episode_mask(mask, traj.has_eos), scores=scores)
    rewards, _ = full.compute_rewards(traj)
    advantages, returns = full.compute_advantages(rewards, traj)
    assert advantages.abs().sum() > 1
    g_full, g_accum = _gradients(full, traj, advantages, returns), _gradients(accum, traj, advantages, returns)
    assert g_full.keys() == g_accum.keys() and g_full
    assert sum(g.norm() for g in g_full.values()) > 1e-3  # not zero against zero
    for name in g_full:
        assert torch.allclose(g_full[name], g_accum[name], rtol=1e-4, atol=1e-7), name


def test_shared_prompts_give_the_same_reference_logprobs_and_gradients_from_fewer_tokens(upstream, monkeypatch):
    """`share_prompts` (on by default for groups): each group's prompt packed once in every forward of the loop
    (the reference's, the update's), the same numbers as one copy per response to float rounding."""
    shared, own = open_stage(upstream), open_stage(upstream, "stages.grpo.share_prompts=false")
    assert shared.config.share_prompts is True and own.config.share_prompts is False
    lengths = {}

    def counting(stage, name):
        real = stage.pack

        def pack(*batch):
            packed = real(*batch)
            lengths.setdefault(name, []).append(packed.input_ids.shape[1])
            return packed
        monkeypatch.setattr(stage, "pack", pack)

    counting(shared, "shared")
    counting(own, "own")
    torch.manual_seed(0)
    traj = own.make_trajectory(own.prompts_for_step(0))
    torch.manual_seed(0)
    traj_shared = shared.make_trajectory(shared.prompts_for_step(0))
    assert torch.equal(traj.response_ids, traj_shared.response_ids)
    assert torch.allclose(traj.ref_logprobs, traj_shared.ref_logprobs, atol=1e-5)
    scores = torch.tensor([0.0, 1.0, 3.0, -1.0, 2.0, 2.0, 0.5, -2.0])  # differing within each group
    traj = traj._replace(scores=scores)
    rewards, _ = own.compute_rewards(traj)
    advantages, returns = own.compute_advantages(rewards, traj)
    g_own, g_shared = _gradients(own, traj, advantages, returns), _gradients(shared, traj, advantages, returns)
    assert g_own.keys() == g_shared.keys() and sum(g.norm() for g in g_own.values()) > 1e-3
    for name in g_own:
        assert torch.allclose(g_own[name], g_shared[name], rtol=1e-4, atol=1e-6), name
    # the trajectory's pack, then one per minibatch: two groups of 4 share their prompts, wherever the
    # minibatches' shuffle puts them
    assert len(lengths["shared"]) == len(lengths["own"]) == 3
    assert all(s < o for s, o in zip(lengths["shared"], lengths["own"])), lengths


def test_a_grpo_run_publishes_a_policy_without_value_model(upstream):
    pipe = Pipeline(load_experiment(upstream[0], grpo(upstream)))
    results = {r.name: r for r in pipe.run(until="grpo")}
    m = pipe.store.manifest(results["grpo"].key)
    assert m["kind"] == "policy" and m["metrics"]["train_steps"] == 2
    assert set(m["inputs"]) == {"policy", "rewards.reward"} and m["inputs"]["rewards.reward"]["stage"] == "reward"
    rows = [json.loads(line) for line in (pipe.store.local_dir(results["grpo"].key) / "metrics.jsonl").open()]
    assert {"env/reward/test_grpo:word_reward", "env/reward/reward", "policy/kl_loss"} <= set(rows[0])
    assert "value/loss" not in rows[0]
    assert "task" in m["metrics"] and "gold_gain_ci" in m["metrics"]


@pytest.mark.parametrize("fn,message", [
    ("test_grpo:nan_reward", r"reward function 'test_grpo:nan_reward' scored row 0 \(prompt .*, response .*\) as nan"),
    ("test_grpo:raising_reward", r"reward function 'test_grpo:raising_reward' raised on row 0 \(prompt .*, response "
                                 r".*\): RuntimeError: the answer key is missing"),
])
def test_a_broken_reward_function_stops_the_stage_naming_it(upstream, fn, message):
    stage = open_stage(upstream, f"stages.grpo.rewards={{{fn}: 1.0}}")
    with pytest.raises(ValueError, match=message):
        stage.make_trajectory(stage.prompts_for_step(0))
