"""PPO invariants on a tiny model: the checks that decide whether PPO is correct, not just running."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_config

from rlhf.config import load_experiment
from rlhf.engines import Rollout
from rlhf.pipeline import Pipeline
from rlhf.ppo import last_token_index, logprobs_from_logits, policy_loss, response_mask_from_eos
from rlhf.rollout import policy_forward
from rlhf.sampling import encode_prompts


@pytest.fixture(scope="module")
def upstream(ppo_upstream):
    """pretrain -> sft -> reward artifacts, built once for every PPO test of this module."""
    return ppo_upstream


def ppo_stage(path, *overrides):
    """A PPO stage after setup, ready to roll out and update."""
    return Pipeline(load_experiment(path, list(overrides))).stages["ppo"].open(tracking=False)


def test_prompts_longer_than_the_bound_are_dropped(upstream):
    from rlhf.sampling import chat_prompt
    from rlhf.stage import StageError

    full = ppo_stage(upstream)
    tok = full.tokenizer
    lengths = [len(tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in full.prompts]
    assert min(lengths) < max(lengths)  # the data has prompts on both sides of the bound below
    bounded = ppo_stage(upstream, f"stages.ppo.max_prompt_tokens={max(lengths) - 1}")
    assert bounded.prompts == [p for p, n in zip(full.prompts, lengths) if n < max(lengths)]
    too_long = r"every prompt of stages.ppo.prompts .* is longer than stages.ppo.max_prompt_tokens=\d+"
    with pytest.raises(StageError, match=too_long):
        ppo_stage(upstream, f"stages.ppo.max_prompt_tokens={min(lengths) - 1}")


def test_value_model_starts_as_the_reward_model(upstream):
    stage = ppo_stage(upstream)
    value, reward = stage.value_model.state_dict(), stage.rewards.models[0].model.state_dict()
    assert value.keys() == reward.keys()
    assert all(torch.equal(value[k], reward[k]) for k in value)
    assert torch.equal(stage.value_model.score.weight, stage.rewards.models[0].model.score.weight)


def test_first_minibatch_has_ratio_one_and_zero_kl(upstream):
    stage = ppo_stage(upstream)
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    m = traj.response_mask
    assert m.any()
    # the reference is the policy before any update: per-token KL is exactly zero
    assert torch.allclose(traj.logprobs[m], traj.ref_logprobs[m], atol=1e-6)
    idx = torch.arange(stage.config.minibatch_size)
    new, _ = policy_forward(stage.policy, traj.query_ids[idx], traj.query_mask[idx], traj.response_ids[idx],
                            traj.response_mask[idx], stage.config.temperature)
    adv = torch.randn_like(new)
    _, stats = policy_loss(new, traj.logprobs[idx], adv, traj.response_mask[idx], 0.2)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


# Sampling settings Hub checkpoints carry in generation_config.json; each reshapes what `generate` samples.
CARRIED_GENERATION = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 1, "min_new_tokens": 8, "top_k": 5,
                      "temperature": 0.5, "typical_p": 0.9, "return_dict_in_generate": True}


def sft_path(upstream) -> Path:
    return Path(Pipeline(load_experiment(upstream)).stages["ppo"].input_path("policy"))


@pytest.fixture(scope="module")
def carried_policy(upstream, tmp_path_factory) -> Path:
    """The SFT policy saved with `CARRIED_GENERATION` in its generation_config.json."""
    dst = tmp_path_factory.mktemp("carried") / "policy"
    shutil.copytree(sft_path(upstream), dst)
    path = dst / "generation_config.json"
    path.chmod(0o644)
    path.write_text(json.dumps({**json.loads(path.read_text()), **CARRIED_GENERATION}))
    return dst


def spy_on_sampling(monkeypatch, model) -> list[torch.Tensor]:
    """Record what each `model.generate` call samples from: its processed scores, (B, R, V) per call.

    The call itself is left as the caller made it; only the outputs are asked for as well.
    """
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs, return_dict_in_generate=True, output_scores=True)
        calls.append(torch.stack(out.scores, dim=1))
        return out.sequences

    monkeypatch.setattr(model, "generate", generate)
    return calls


def spy_on_draws(monkeypatch) -> list[torch.Tensor]:
    """Record the scores a draw of its own (`GumbelMax`, `InverseCDF`) samples from, (B, V) per token: the
    warped distribution each token of those samplers is drawn from (what `generate` returns as its scores
    is the draw's output)."""
    from rlhf.sampling import DRAWS

    calls = []

    def spy(original):
        def call(self, input_ids, scores):  # transformers reads a processor's signature
            calls.append(scores.clone())
            return original(self, input_ids, scores)

        return call

    for draw in DRAWS.values():
        monkeypatch.setattr(draw, "__call__", spy(draw.__call__))
    return calls


@pytest.mark.parametrize("temperature,carried,sampler,kept", [
    (1.0, False, "gumbel", True), (0.7, False, "inverse_cdf", True), (0.7, False, "gumbel", False),
    (0.7, True, "inverse_cdf", False), (0.7, True, "multinomial", True), (0.7, True, "multinomial", False)])
def test_trained_logprobs_are_those_of_the_sampling_distribution(upstream, carried_policy, monkeypatch, temperature,
                                                                  carried, sampler, kept):
    """The old logprobs, kept by the sampler (`sampler_logprobs`) or from a forward pass, against the
    distribution each token was drawn from."""
    overrides = [f"stages.ppo.temperature={temperature}", f"stages.ppo.sampler={sampler}",
                 f"stages.ppo.sampler_logprobs={kept}"]
    overrides += [f"stages.ppo.policy={carried_policy}"] if carried else []
    stage = ppo_stage(upstream, *overrides)
    assert stage.config.sampler_logprobs is kept
    sampled = spy_on_sampling(monkeypatch, stage.policy)
    warped = spy_on_draws(monkeypatch)
    torch.manual_seed(1)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    if sampler != "multinomial":
        assert len(sampled) == 1
        scores = torch.stack(warped, dim=1)  # (B, R, V) the scores before the draw
    else:
        assert not warped
        (scores,) = sampled  # (B, R, V) generate's logits after its processors: the distribution each token came from
    m = traj.response_mask
    sampling_logprobs = logprobs_from_logits(scores, traj.response_ids, 1.0)
    gap = (traj.logprobs[m] - sampling_logprobs[m]).abs().max().item()
    assert gap < 1e-4, f"PPO's logprobs differ from the sampling distribution's by up to {gap:.3g}"
    if carried:
        assert stage.policy.generation_config.no_repeat_ngram_size == 1  # the checkpoint's own config is left as is
        # tokens that no_repeat_ngram_size=1 would have forbidden were sampled: one seen earlier in its sequence
        def repeats(prompt: list[int], response: list[int]) -> bool:
            return any(t in prompt + response[:i] for i, t in enumerate(response))

        assert any(repeats(q[mq].tolist(), r[mr].tolist())
                   for q, mq, r, mr in zip(traj.query_ids, traj.query_mask, traj.response_ids, m))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_ignores_the_checkpoints_generation_config(carried_policy, temperature):
    from transformers import GenerationConfig

    from rlhf.models import load_causal_lm
    from rlhf.sampling import sample

    carried, tok = load_causal_lm(str(carried_policy))
    plain = copy.deepcopy(carried)
    plain.generation_config = GenerationConfig()
    prompts = [f'Use the word "{w}" in a sentence.' for w in ("sky", "river", "stone", "cat")]
    out = []
    for model in (carried, plain):
        torch.manual_seed(0)
        out.append(sample(model, tok, prompts, max_new_tokens=8, temperature=temperature))
    assert out[0] == out[1]
    assert carried.generation_config.repetition_penalty == 1.3


def tiny_gpt2(vocab_size: int):
    """A 2-layer GPT-2: absolute position embeddings, so a token's position moves its logits (rotary
    positions as in Llama see only relative offsets, which a uniform shift keeps)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.parametrize("packed", [False, True])
def test_left_padding_gives_the_same_logprobs(upstream, packed):
    from rlhf.packing import use_packed_attention
    from rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(str(sft_path(upstream)))
    policy = tiny_gpt2(len(tok))
    if packed:
        use_packed_attention(policy)
    short, long = "Use the word \"sky\" in a sentence.", "Use the word \"river\" in a sentence, please, right now."
    response = torch.tensor([tok("The sky is blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    r_mask = torch.ones_like(response, dtype=torch.bool)
    alone = encode_prompts(tok, [short])
    batch = encode_prompts(tok, [long, short])  # second: packed, it starts after the long one's tokens
    assert (batch["attention_mask"][1] == 0).any()  # the short prompt really is left-padded
    lp_alone, _ = policy_forward(policy, alone["input_ids"], alone["attention_mask"].bool(), response, r_mask, 1.0,
                                 packed=packed)
    lp_batch, _ = policy_forward(policy, batch["input_ids"], batch["attention_mask"].bool(), response.repeat(2, 1),
                                 r_mask.repeat(2, 1), 1.0, packed=packed)
    assert torch.allclose(lp_alone[0], lp_batch[1], atol=1e-5), (lp_alone[0] - lp_batch[1]).abs().max()


def test_lora_dropout_is_refused(workdir):
    from rlhf.config import ConfigError

    path = write_config(workdir / "e.yaml", {"stages": {"ppo": {"lora": {"enabled": True, "dropout": 0.1}}}})
    with pytest.raises(ConfigError, match=r"e\.yaml: stages\.ppo\.lora\.dropout: 0\.1 must be 0 in PPO"):
        load_experiment(path)
    write_config(path, {"stages": {"ppo": {"lora": {"enabled": True, "dropout": 0.0}}}})
    load_experiment(path)


def _captured_gradients(stage, traj, advantages, returns):
    grads = {}

    def capture():
        # keyed by model too: the policy's parameter names are the value model's (model.layers.0...)
        for model, module in (("policy", stage.policy), ("value", stage.value_model)):
            for name, p in module.named_parameters():
                if p.grad is not None:
                    grads[model, name] = p.grad.detach().clone()

    stage.optimizer.step = capture  # look at the accumulated gradient instead of stepping
    torch.manual_seed(3)
    stage.update(traj, advantages, returns)
    return grads


@pytest.mark.parametrize("after_eos", ["false", "true"])
def test_gradient_accumulation_equals_full_batch(upstream, after_eos):
    common = ["stages.ppo.ppo_epochs=1", "stages.ppo.num_minibatches=1", "stages.ppo.max_grad_norm=1e9",
              f"stages.ppo.score_after_eos={after_eos}"]
    full = ppo_stage(upstream, *common, "stages.ppo.gradient_accumulation_steps=1")
    accum = ppo_stage(upstream, *common, "stages.ppo.gradient_accumulation_steps=4")
    torch.manual_seed(0)
    traj = full.make_trajectory(full.prompts_for_step(0))
    # Give rows different response lengths (as EOS at different places would), so micro-batches hold
    # different token counts and a plain average of micro-batch means would not match the full batch.
    # Every row ends in EOS, so with score_after_eos the value loss counts one more position per row
    # than the policy loss except in rows that fill every column: its weights must be its own.
    lengths = torch.arange(traj.response_ids.shape[0]) % traj.response_ids.shape[1] + 1
    mask = torch.arange(traj.response_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    eos = torch.ones_like(traj.has_eos)
    traj = traj._replace(response_mask=mask, has_eos=eos, episode_mask=full.episode_mask(mask, eos))
    rewards, _ = full.compute_rewards(traj)
    advantages, returns = full.compute_advantages(rewards, traj)
    g_full = _captured_gradients(full, traj, advantages, returns)
    g_accum = _captured_gradients(accum, traj, advantages, returns)
    assert g_full.keys() == g_accum.keys() and g_full
    for model in ("policy", "value"):  # both compared, and neither is zero against zero
        assert sum(g.norm() for (m, _), g in g_full.items() if m == model) > 1e-3, model
    for name in g_full:
        assert torch.allclose(g_full[name], g_accum[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("packed", ["true", "false"])
def test_score_after_eos_is_scored_and_valued_after_eos(upstream, packed, monkeypatch):
    stage = ppo_stage(upstream, "stages.ppo.score_after_eos=true", f"stages.ppo.pack_sequences={packed}")
    tok, sample = stage.tokenizer, stage.rollout

    def rollout_ending_in_eos(prompts):  # the tiny test policy rarely stops by itself: end row i at i % (R - 1)
        q_ids, q_mask, r_ids, _, _ = sample(prompts)
        cols = torch.arange(r_ids.shape[1]).unsqueeze(0)
        ends = torch.arange(len(r_ids)) % (r_ids.shape[1] - 1)
        r_ids = torch.where(cols == ends.unsqueeze(1), tok.eos_token_id, r_ids)
        r_mask = response_mask_from_eos(r_ids, tok.eos_token_id)
        return Rollout(q_ids, q_mask, torch.where(r_mask, r_ids, tok.pad_token_id), r_mask)

    monkeypatch.setattr(stage, "rollout", rollout_ending_in_eos)
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    m = traj.response_mask
    after = stage.episode_mask(m, traj.has_eos) & ~m
    rows = after.any(dim=1)
    assert rows.all() and (after.sum(dim=1) == 1).all()  # every row ended in EOS with room after it
    # The value model is still the reward model: its value after EOS is the raw score itself.
    assert torch.allclose(traj.values[after], traj.raw_scores[rows], atol=1e-5)
    rewards, kl = stage.compute_rewards(traj)
    eos = last_token_index(m)
    assert torch.allclose(rewards[after], traj.scores[rows])  # the whole score there, no KL term
    assert torch.allclose(rewards[rows, eos[rows]], -stage.kl_ctl.value * kl[rows, eos[rows]])
    advantages, returns = stage.compute_advantages(rewards, traj)
    assert torch.allclose(returns[after], traj.scores[rows], atol=1e-6)  # the episode ends after that state
    assert (advantages[after] == 0).all()  # no action there to reinforce


def test_every_trainable_parameter_changes(upstream):
    stage = ppo_stage(upstream)
    before = {n: p.detach().clone() for n, p in list(stage.policy.named_parameters())
              + [("v." + n, p) for n, p in stage.value_model.named_parameters()] if p.requires_grad}
    stage.baseline = None
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    rewards, _ = stage.compute_rewards(traj)
    stage.update(traj, *stage.compute_advantages(rewards, traj))
    after = dict(list(stage.policy.named_parameters()) + [("v." + n, p) for n, p in stage.value_model.named_parameters()])
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert unchanged == []
    assert all(not p.requires_grad for p in stage.rewards.models[0].model.parameters())
    assert all(not p.requires_grad for p in stage.reference.parameters())


# Resuming to the same weights as a run never stopped: tests/test_kill_resume.py (a process killed inside
# a checkpoint write, which covers a clean stop between checkpoints).


def test_watchdog_stops_and_keeps_the_last_good_policy(upstream):
    # k3: every token's estimate is >= 0 and > 0 where the policies differ (k1's batch mean may be <= 0 for a draw)
    pipe = Pipeline(load_experiment(upstream, ["stages.ppo.num_steps=4", "stages.ppo.kl_budget=1e-9",
                                               "stages.ppo.kl_estimator=k3"]))
    results = {r.name: r for r in pipe.run()}
    m = results["ppo"].metrics
    # step 0's rollout comes from the SFT policy (KL 0); step 1's from the updated policy (KL > 0): stop there
    assert m["stopped_early"].startswith("step 1: KL to the reference")
    assert m["train_steps"] == 1
    from transformers import AutoModelForCausalLM

    ppo = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["ppo"].key)).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["sft"].key)).state_dict()
    assert all(torch.equal(ppo[k], sft[k]) for k in sft)  # the last good policy is the one before the update


def test_watchdog_on_the_first_rollout_keeps_the_starting_policy(upstream):
    # A response-length bound no rollout can meet trips on step 0, before any policy was kept in memory.
    pipe = Pipeline(load_experiment(upstream, ["stages.ppo.num_steps=3", "stages.ppo.min_response_length=1e9"]))
    results = {r.name: r for r in pipe.run()}
    m = results["ppo"].metrics
    assert m["stopped_early"].startswith("step 0: mean response length") and m["train_steps"] == 0
    from transformers import AutoModelForCausalLM

    ppo = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["ppo"].key)).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["sft"].key)).state_dict()
    assert all(torch.equal(ppo[k], sft[k]) for k in sft)


def test_diversity_watchdog_stops_a_collapsing_policy_and_keeps_the_last_good_one(upstream, monkeypatch):
    """From step 1 on the policy is forced to give one response to every prompt: the watchdog stops the run
    there and the published policy is the one that produced step 0's diverse rollout (the SFT policy)."""
    from stages.ppo import PPOStage

    original, calls = PPOStage.rollout, []

    def collapsing(self, prompts):
        out = original(self, prompts)
        calls.append(len(prompts))
        if len(calls) > 1:  # every row becomes row 0's response
            r_ids, r_mask = out.response_ids, out.response_mask
            out = out._replace(response_ids=r_ids[:1].expand_as(r_ids).clone(),
                               response_mask=r_mask[:1].expand_as(r_mask).clone())
        return out

    monkeypatch.setattr(PPOStage, "rollout", collapsing)
    pipe = Pipeline(load_experiment(upstream, ["stages.ppo.num_steps=4", "stages.ppo.min_unique_share=0.5"]))
    results = {r.name: r for r in pipe.run()}
    m = results["ppo"].metrics
    assert m["stopped_early"].startswith("step 1: only 12% of the rollout's responses are distinct")  # 1 of 8
    assert m["train_steps"] == 1
    from transformers import AutoModelForCausalLM

    ppo = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["ppo"].key)).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["sft"].key)).state_dict()
    assert all(torch.equal(ppo[k], sft[k]) for k in sft)


def test_ppo_manifest_compares_with_the_reference_on_the_shared_evaluation(upstream):
    pipe = Pipeline(load_experiment(upstream, ["stages.ppo.num_steps=2"]))
    results = {r.name: r for r in pipe.run()}
    m = pipe.store.manifest(results["ppo"].key)
    metrics = m["metrics"]
    for role in ("gold", "heldout", "task", "fluency"):
        for prefix in ("", "greedy_"):
            for suffix in ("", "_ref", "_gain", "_gain_ci"):
                assert f"{prefix}{role}{suffix}" in metrics, f"{prefix}{role}{suffix}"
    for key in ("unique_share", "top_share", "template_top_share", "distinct_1", "distinct_2", "response_length"):
        assert key in metrics and f"{key}_ref" in metrics and f"greedy_{key}" in metrics
    assert metrics["eval_prompts"] == 8 and "kl" in metrics
    assert len(metrics["samples"]) == 2
    assert set(metrics["samples"][0]) == {"prompt", "before", "after", "greedy_before", "greedy_after"}
    # the baseline is the SFT policy measured by the same evaluation as the SFT stage's own
    sft = pipe.store.manifest(results["sft"].key)["metrics"]
    assert metrics["greedy_task_ref"] == sft["greedy_task"] and metrics["gold_ref"] == sft["gold"]
    assert m["headline"].startswith("gold ") and "task success" in m["headline"]
    assert m["inputs"]["policy"]["stage"] == "sft" and m["inputs"]["rewards.reward"]["stage"] == "reward"
    assert m["kind"] == "policy"
