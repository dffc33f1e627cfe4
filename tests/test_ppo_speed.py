"""Speed changes in the PPO loop that must not change a number: trimming padding columns from
micro-batches, and running the LM head only over the response columns."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.ppo import logprobs_from_logits
from rlhf.rollout import Trajectory, policy_forward, sequence_inputs, trim_padding


def _traj(query_mask, response_mask) -> Trajectory:
    b, p = query_mask.shape
    r = response_mask.shape[1]
    ids = torch.arange(b * (p + r)).view(b, p + r)
    per_token = torch.arange(b * r, dtype=torch.float).view(b, r)
    return Trajectory(ids[:, :p], query_mask, ids[:, p:], response_mask, per_token, per_token + 1, per_token + 2,
                      torch.zeros(b), torch.ones(b), torch.ones(b, dtype=torch.bool))


def test_trim_padding_drops_only_columns_no_row_uses():
    # row 0: prompt in the last 2 of 4 columns, response 1 token; row 1: prompt 3 columns, response 2 of 5
    q = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    r = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    traj = _traj(q, r)
    adv = torch.randn(2, 5)
    out, adv_out = trim_padding(traj, adv)
    assert out.query_ids.shape == (2, 3) and torch.equal(out.query_ids, traj.query_ids[:, 1:])
    assert torch.equal(out.query_mask, q[:, 1:])
    for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values"):
        assert torch.equal(getattr(out, name), getattr(traj, name)[:, :2]), name
    assert torch.equal(adv_out, adv[:, :2])
    assert out.scores is traj.scores and out.has_eos is traj.has_eos


def test_trim_padding_keeps_a_full_batch_and_one_column_of_an_empty_one():
    full = _traj(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    (same,) = trim_padding(full)
    assert same.query_ids.shape == (2, 3) and same.response_ids.shape == (2, 4)
    empty = _traj(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool))
    (out,) = trim_padding(empty)
    assert out.response_ids.shape == (2, 1)


@pytest.fixture(scope="module")
def stage(ppo_upstream):
    return Pipeline(load_experiment(ppo_upstream)).stages["ppo"].open(tracking=False)


def test_policy_forward_equals_logprobs_of_the_full_logits(stage):
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    args = (traj.query_ids, traj.query_mask, traj.response_ids, traj.response_mask)
    ids, mask, pos = sequence_inputs(*args)
    logits = stage.policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # every column
    p = traj.query_ids.shape[1]
    expected = logprobs_from_logits(logits[:, p - 1 : -1], traj.response_ids, 0.7)
    got, _ = policy_forward(stage.policy, *args, 0.7)
    m = traj.response_mask
    assert torch.allclose(got[m], expected[m], atol=1e-6)


@pytest.mark.parametrize("after_eos", [False, True])
def test_trimmed_micro_batch_gives_the_same_loss_and_gradients(stage, monkeypatch, after_eos):
    monkeypatch.setattr(stage.config, "score_after_eos", after_eos)
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    # short responses in the first rows, so the micro-batch of those rows has padding columns to drop
    b, r = traj.response_ids.shape
    lengths = torch.arange(b) % 3 + 1
    mask, eos = torch.arange(r).unsqueeze(0) < lengths.unsqueeze(1), torch.ones(b, dtype=torch.bool)
    traj = traj._replace(response_mask=mask, has_eos=eos, episode_mask=stage.episode_mask(mask, eos))
    rewards, _ = stage.compute_rewards(traj)
    advantages, returns = stage.compute_advantages(rewards, traj)
    idx = torch.arange(4)
    mb = traj.rows(idx)
    trimmed, adv, ret = trim_padding(mb, advantages[idx], returns[idx])
    counts = {"sequences": 4, "tokens": mb.response_mask.sum(), "value_tokens": mb.episode_mask.sum()}
    # the state after EOS needs the column after the longest response
    assert trimmed.response_ids.shape[1] == (4 if after_eos else 3) < r
    results = []
    for batch, a, g in ((mb, advantages[idx], returns[idx]), (trimmed, adv, ret)):
        stage.optimizer.zero_grad()
        pg, vf, _ = stage.loss(batch, a, g, counts)
        loss = pg + stage.config.vf_coef * vf
        loss.backward()
        grads = {n: p.grad.clone() for n, p in list(stage.policy.named_parameters())
                 + list(stage.value_model.named_parameters()) if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_full, g_full), (loss_trim, g_trim) = results
    stage.optimizer.zero_grad()
    assert torch.allclose(loss_full, loss_trim, atol=1e-6)
    assert g_full.keys() == g_trim.keys() and g_full
    for n in g_full:
        assert torch.allclose(g_full[n], g_trim[n], rtol=1e-4, atol=1e-7), n


def test_optimizer_is_the_fused_adamw_on_cpu(stage):
    opt = getattr(stage.optimizer, "optimizer", stage.optimizer)  # unwrap Accelerate's wrapper
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["lr"] for g in opt.param_groups] == [stage.config.learning_rate, stage.config.value_learning_rate]
    assert opt.defaults["eps"] == 1e-5


def test_entropy_as_a_statistic_keeps_no_graph_and_the_same_value(stage):
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    args = (stage.policy, traj.query_ids, traj.query_mask, traj.response_ids, traj.response_mask, 1.0)
    logp, ent = policy_forward(*args, with_entropy=True)
    logp_stat, ent_stat = policy_forward(*args, with_entropy=True, entropy_grad=False)
    assert ent.requires_grad and not ent_stat.requires_grad and logp_stat.requires_grad
    assert torch.equal(ent.detach(), ent_stat) and torch.equal(logp, logp_stat)
