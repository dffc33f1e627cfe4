"""`PPOStage.update` itself, in one process and in seconds: gradient accumulation and 2 and 4 ranks give
the whole minibatch's gradient, for every loss aggregation, the KL in the loss or in the reward, with and
without a value model.

Ranks are threads: each holds its own copy of the models and its rows of the batch, and a fake
accelerator sums what the threads pass to `reduce`; a data-parallel wrapper averages the ranks'
gradients, so the test does. A 2-layer Llama in float64 (the value head reads out in float32) makes
the comparison tight; the slow two-process version is tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from rlhf.launch import RLLaunch
from rlhf.ppo import FixedKLController, with_state_after_eos
from rlhf.rollout import Trajectory, policy_forward
from stages.ppo import PPOStage
from stages.ppo_config import PPOConfig

B, P, R = 8, 3, 6  # rows, prompt columns, response columns
LENGTHS = torch.tensor([1, 6, 2, 5, 3, 3, 4, 1])  # micro-batches hold different token counts


class World:
    """What the thread-ranks share: a barrier and one slot per rank for `reduce`."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n


class FakeAccelerator:
    """The part of `accelerate.Accelerator` that `RLLaunch` and `PPOStage.update` call, for rank `rank`."""

    def __init__(self, world: World, rank: int):
        self.world, self.process_index, self.num_processes = world, rank, world.n
        self.device = torch.device("cpu")

    def reduce(self, t, reduction="sum"):
        w = self.world
        w.slots[self.process_index] = t.clone()
        w.barrier.wait()
        total = sum(w.slots)
        w.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return total if reduction == "sum" else total / w.n

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        pass  # max_grad_norm is huge: clipping would only rescale

    def unwrap_model(self, model):
        return model


class CapturingOptimizer:
    """Records the accumulated gradients at `step` instead of stepping."""

    def __init__(self, policy, value):
        self.models = {"policy": policy, "value": value}
        self.steps: list[dict] = []

    def step(self):
        self.steps.append({(m, n): p.grad.detach().clone() for m, model in self.models.items() if model is not None
                           for n, p in model.named_parameters() if p.grad is not None})

    def zero_grad(self):
        for model in self.models.values():
            if model is not None:
                model.zero_grad(set_to_none=True)


def tiny_models():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, num_labels=1)
    # (sdpa, the default: eager attention in float64 gives NaN on the left-padded rows' padding)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double(), LlamaForSequenceClassification(cfg).double()


def batch(policy):
    """One rollout batch of B rows: left-padded prompts, responses of LENGTHS ending in EOS, the state after
    EOS in the episode; old and reference logprobs near the policy's, so ratios and the KL are not trivial."""
    g = torch.Generator().manual_seed(1)
    query_mask = torch.ones(B, P, dtype=torch.bool)
    query_mask[::3, 0] = False
    query_ids = torch.where(query_mask, torch.randint(1, 32, (B, P), generator=g), 0)
    response_mask = torch.arange(R).unsqueeze(0) < LENGTHS.unsqueeze(1)  # (B, R)
    response_ids = torch.where(response_mask, torch.randint(1, 32, (B, R), generator=g), 0)
    eos = torch.ones(B, dtype=torch.bool)
    episode_mask = with_state_after_eos(response_mask, eos)
    with torch.no_grad():
        logprobs, _ = policy_forward(policy, query_ids, query_mask, response_ids, response_mask, 1.0)

    def near(x):
        return torch.where(response_mask, x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype), 0.0)

    values = torch.where(episode_mask, torch.randn(B, R, generator=g), 0.0)
    traj = Trajectory(query_ids, query_mask, response_ids, response_mask, near(logprobs), near(logprobs), values,
                      torch.randn(B, generator=g), torch.zeros(B), eos, episode_mask)
    advantages = torch.where(response_mask, torch.randn(B, R, generator=g, dtype=torch.float64), 0.0)
    returns = torch.where(episode_mask, torch.randn(B, R, generator=g), 0.0)
    return traj, advantages, returns


def stage_for(config: PPOConfig, policy, value, accelerator) -> PPOStage:
    """A PPOStage with just what `update` and `loss` read (setup() would load models from the store)."""
    stage = PPOStage.__new__(PPOStage)
    stage.config, stage.accelerator = config, accelerator
    stage.policy, stage.value_model = copy.deepcopy(policy), copy.deepcopy(value) if value is not None else None
    stage.kl_ctl = FixedKLController(config.kl_coef)
    stage.launch = RLLaunch(accelerator, micro_batch_size=config.micro_batch_size,
                            gradient_accumulation_steps=config.gradient_accumulation_steps, max_grad_norm=1e9)
    stage.launch.policy, stage.launch.value_model = stage.policy, stage.value_model
    stage.optimizer = CapturingOptimizer(stage.policy, stage.value_model)
    return stage


def gradient(settings: dict, ranks: int, accumulation: int, with_value: bool) -> dict:
    """The gradient of one update over the whole batch (one minibatch), averaged over `ranks` thread-ranks."""
    policy, value = tiny_models()
    value = value if with_value else None
    traj, advantages, returns = batch(policy)
    config = PPOConfig(rollout_batch_size=B, num_minibatches=1, ppo_epochs=1, gradient_accumulation_steps=accumulation,
                       pack_sequences=False, max_grad_norm=1e9, kl_coef=0.1, **settings)
    world, results, errors = World(ranks), [None] * ranks, []

    def rank(r):
        try:
            stage = stage_for(config, policy, value, FakeAccelerator(world, r))
            rows = torch.tensor(stage.launch.local_rows(list(range(B))))
            stage.update(traj.rows(rows), advantages[rows], returns[rows] if with_value else None)
            (results[r],) = stage.optimizer.steps  # one minibatch, one epoch: one step
        except BaseException as e:  # noqa: BLE001 - reported below, and the other ranks must not wait forever
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {k: sum(res[k] for res in results) / ranks for k in results[0]}


SPLITS = [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2)]  # (ranks, micro-batches per rank)


@pytest.mark.parametrize("with_value", [True, False], ids=["value_model", "no_value_model"])
@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum"])
def test_accumulation_and_ranks_give_the_whole_minibatch_gradient(mode, kl_penalty, with_value):
    settings = {"loss_aggregation": mode, "kl_penalty": kl_penalty, "max_new_tokens": 8}
    whole = gradient(settings, ranks=1, accumulation=1, with_value=with_value)
    policy_norm = sum(g.norm() ** 2 for (m, _), g in whole.items() if m == "policy") ** 0.5
    assert policy_norm > 1e-3  # not zero against zero
    if with_value:
        assert sum(g.norm() for (m, _), g in whole.items() if m == "value") > 1e-3
    for ranks, accumulation in SPLITS:
        split = gradient(settings, ranks=ranks, accumulation=accumulation, with_value=with_value)
        assert split.keys() == whole.keys()
        for k in whole:
            assert torch.allclose(split[k], whole[k], rtol=1e-5, atol=1e-9), (ranks, accumulation, k,
                                                                              (split[k] - whole[k]).abs().max())


def test_sequence_sum_divides_by_max_new_tokens_not_the_trimmed_width():
    # Dr. GRPO's loss is sum / (S x max_new_tokens), with the KL term reduced the same way: doubling
    # max_new_tokens halves the whole policy gradient. (The batch's responses are at most 6 tokens, so
    # a micro-batch trimmed to its width would divide by 6 or less, whatever max_new_tokens says.)
    settings = {"loss_aggregation": "sequence_sum", "kl_penalty": "loss"}
    g8 = gradient({**settings, "max_new_tokens": 8}, ranks=1, accumulation=2, with_value=False)
    g16 = gradient({**settings, "max_new_tokens": 16}, ranks=1, accumulation=2, with_value=False)
    for k in g8:
        assert torch.allclose(g16[k], g8[k] / 2, rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_the_whole_minibatch_gradient_is_that_of_the_plain_losses(kl_penalty):
    # The reference the splits are compared with, pinned: one micro-batch on one rank gives the gradient of
    # policy_loss (token mean over the batch's response tokens) + coef x k3 (KL in the loss) + vf_coef x
    # value_loss (mean over the episode positions, the state after EOS included), written out here.
    from rlhf.ppo import kl_k3, masked_sum, policy_loss, value_loss
    from rlhf.rollout import value_forward

    whole = gradient({"kl_penalty": kl_penalty}, ranks=1, accumulation=1, with_value=True)
    policy, value = tiny_models()
    traj, advantages, returns = batch(policy)
    n_tokens = traj.response_mask.sum()
    logprobs, _ = policy_forward(policy, traj.query_ids, traj.query_mask, traj.response_ids, traj.response_mask, 1.0)
    pg, _ = policy_loss(logprobs, traj.logprobs, advantages, traj.response_mask, 0.2,
                        reduce=lambda x: masked_sum(x, traj.response_mask) / n_tokens)
    if kl_penalty == "loss":
        pg = pg + 0.1 * masked_sum(kl_k3(logprobs, traj.ref_logprobs), traj.response_mask) / n_tokens
    values = value_forward(value, traj.query_ids, traj.query_mask, traj.response_ids, traj.response_mask,
                           value_mask=traj.episode_mask)
    vf, _ = value_loss(values, traj.values, returns, traj.episode_mask, 0.2)
    (pg + 0.5 * vf).backward()
    expected = {("policy", n): p.grad for n, p in policy.named_parameters() if p.grad is not None}
    expected |= {("value", n): p.grad for n, p in value.named_parameters() if p.grad is not None}
    assert whole.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(whole[k], expected[k], rtol=1e-5, atol=1e-9), k


def test_max_grad_norm_zero_computes_no_norm():
    # 0 turns clipping off (as the Trainer stages, and TRL's PPO loop, which never clips): no norm is computed,
    # where any positive norm clips once per optimizer step
    policy, value = tiny_models()
    traj, advantages, returns = batch(policy)
    calls = {}
    for norm in (0.0, 1e9):
        config = PPOConfig(rollout_batch_size=B, num_minibatches=2, ppo_epochs=1, pack_sequences=False,
                           max_grad_norm=norm, kl_coef=0.1)
        stage = stage_for(config, policy, value, FakeAccelerator(World(1), 0))
        calls[norm] = []
        stage.accelerator.clip_grad_norm_ = lambda parameters, max_norm, seen=calls[norm]: seen.append(max_norm)
        stage.update(traj, advantages, returns)
        assert len(stage.optimizer.steps) == 2
    assert calls == {0.0: [], 1e9: [1e9, 1e9]}


@pytest.mark.parametrize("lora", [False, True])
def test_the_last_good_policy_copy_holds_what_training_changes_and_restores_it(lora):
    # The watchdogs' copy of the last good policy (one per rollout) leaves a LoRA policy's frozen base weights
    # out: they never change, and on SmolLM2-135M the copy is 19.5 MB instead of 671. Restoring it undoes every change.
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    policy = tiny_models()[0]
    policy.config.tie_word_embeddings = True
    policy.tie_weights()  # a tied alias (lm_head.weight) must be left out with the weight it aliases
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    launch = RLLaunch(Accelerator(cpu=True), micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=0.0)
    launch.policy = policy
    whole = policy.state_dict()
    copied = launch.policy_state_copy()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    if lora:
        assert set(copied) == trainable and all("lora_" in n for n in copied)
    else:
        assert set(copied) == set(whole)
        assert copied["lm_head.weight"] is copied["model.embed_tokens.weight"]  # a tied weight, copied once
    assert all(not v.is_set_to(whole[k]) and torch.equal(v, whole[k]) for k, v in copied.items())  # copies
    before = {k: v.clone() for k, v in whole.items()}
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(1.0)
    launch.restore_policy(copied)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    with pytest.raises(RuntimeError, match="does not fit the policy: missing"):
        launch.restore_policy({k: v for k, v in copied.items() if k not in sorted(trainable)[:1]})
