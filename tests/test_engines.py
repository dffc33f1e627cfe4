"""Rollout engines and sampling ahead (rlhf/engines.py) in the RL loop, without vLLM.

The `Sampler` keeps the order the loop asks for (a weight sync lands between the rollouts before and after
it); an engine with its own copy of the policy trains the same weights as sampling from the policy itself;
one step off-policy samples with the previous update's weights, and the mismatch it logs says so; the loss
variants (GSPO, CISPO, clip-higher) run through the loop.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import small_rl_run
from rlhf.config import load_experiment
from rlhf.engines import HFEngine, Rollout, RolloutEngine, Sampler
from rlhf.pipeline import Pipeline


def rl_config(upstream, stage_name, *overrides):
    """The config of RL stage `stage_name` in a short run (`small_rl_run`) with `overrides` ("field=value")."""
    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    run = [*small_rl_run(stage_name, prompts), *(f"stages.{stage_name}.{o}" for o in overrides)]
    return load_experiment(upstream, run).stages[stage_name].config


class Counter(RolloutEngine):
    """A fake engine whose weights are one number; every rollout carries the number it sampled with."""

    holds_weights = True

    def __init__(self):
        super().__init__(None, None, None)
        self.current, self.log = 0, []

    def sample(self, prompts):
        self.log.append(("sample", self.current))
        return Rollout(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[self.current]]),
                       torch.ones(1, 1, dtype=torch.bool))

    def weights(self, policy):
        return {"w": torch.tensor(policy["w"])}  # a snapshot: the trainer may change policy["w"] afterwards

    def load(self, weights):
        self.current = int(weights["w"])
        self.log.append(("load", self.current))


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_a_rollout_asked_for_after_a_sync_samples_with_those_weights(staleness, tmp_path):
    engine, policy = Counter(), {"w": 0}
    sampler = Sampler(engine.sample, engine, staleness)
    # the loop's schedule: at step s ask for s .. s + staleness, take s, update, sync
    seen = []
    for step in range(4):
        for ahead in range(step, step + staleness + 1):
            sampler.submit(ahead, ["p"])
        seen.append(int(sampler.take(step).response_ids))
        policy["w"] = step + 1  # the update
        sampler.sync(policy)
    # step s trains on weights s (after s updates), sampled with weights max(s - staleness, 0)
    assert seen == [max(s - staleness, 0) for s in range(4)]
    ahead = sampler.drain()
    assert sorted(ahead) == list(range(4, 4 + staleness))
    sampler.save(tmp_path)
    again = Sampler(engine.sample, Counter(), staleness)
    again.load(tmp_path)
    assert {s: int(again.take(s).response_ids) for s in ahead} == {s: int(r.response_ids) for s, r in ahead.items()}
    assert (tmp_path / "rollouts.pt").exists() == bool(staleness)
    sampler.close()


def test_a_failed_weight_load_on_the_worker_stops_the_next_rollout():
    class Broken(Counter):
        def load(self, weights):
            raise RuntimeError("weights do not fit")

    engine = Broken()
    sampler = Sampler(engine.sample, engine, 1)
    sampler.submit(0, ["p"])
    sampler.take(0)
    sampler.sync({"w": 1})
    sampler.submit(1, ["p"])
    sampler.pending[1].result()
    with pytest.raises(RuntimeError, match="weights do not fit"):
        sampler.take(1)
    sampler.close()


@pytest.fixture(scope="module")
def upstream(ppo_upstream):
    return ppo_upstream


def grpo(upstream, *overrides):
    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    return [*small_rl_run("grpo", prompts, num_steps=3, no_eos_score="null",
                          rewards="{reward: 1.0, conftest:length_judge: 0.1}"), *overrides]


def run_grpo(upstream, *overrides):
    """(metrics rows, weights, manifest metrics) of a GRPO run from the tiny upstream."""
    from transformers import AutoModelForCausalLM

    pipe = Pipeline(load_experiment(upstream, grpo(upstream, *overrides)))
    result = {r.name: r for r in pipe.run(until="grpo")}["grpo"]
    out = pipe.store.local_dir(result.key)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "env/score" in r], AutoModelForCausalLM.from_pretrained(out).state_dict(), result


@pytest.fixture(scope="module")
def in_place(upstream):
    return run_grpo(upstream)


def test_an_engine_with_its_own_copy_trains_the_same_weights_at_staleness_0(upstream, in_place, monkeypatch):
    """The copy is refreshed after every update, so it samples what the policy itself would: the same tokens,
    importance weights of 1 (up to float rounding between padded and packed forwards), the same weights."""
    from stages.ppo import PPOStage

    build = PPOStage.build_engine

    def copying_engine(self):
        engine = build(self)
        return HFEngine(engine.tokenizer, engine.launch, engine.settings, copy=True)

    monkeypatch.setattr(PPOStage, "build_engine", copying_engine)
    rows, weights, _ = run_grpo(upstream, "stages.grpo.seed=0", "stages.grpo.importance_upper=1.5")
    ref_rows, ref_weights, _ = in_place
    assert [r["env/score"] for r in rows] == pytest.approx([r["env/score"] for r in ref_rows], abs=1e-5)
    assert all(r["rollout/mismatch_kl"] < 1e-9 and abs(r["rollout/ratio_mean"] - 1) < 1e-5 for r in rows)
    for k in ref_weights:
        assert torch.allclose(weights[k], ref_weights[k], atol=1e-5), k
    assert any(not torch.equal(ref_weights[k], v) for k, v in _sft(upstream).items())  # it trained


def _sft(upstream):
    from transformers import AutoModelForCausalLM

    pipe = Pipeline(load_experiment(upstream))
    return AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(pipe.stages["sft"].key)).state_dict()


def test_one_step_off_policy_samples_with_the_previous_updates_weights(upstream, in_place):
    rows, weights, result = run_grpo(upstream, "stages.grpo.max_staleness=1")
    # step 1's rollout was sampled before any update (no mismatch); steps 2 and 3 with weights one update old
    assert rows[0]["rollout/mismatch_kl"] < 1e-9
    assert all(r["rollout/mismatch_kl"] > 1e-7 for r in rows[1:])
    assert all(0 <= r["rollout/truncated_share"] <= 1 for r in rows)
    assert result.metrics["train_steps"] == 3
    _, ref_weights, _ = in_place
    assert any(not torch.allclose(weights[k], ref_weights[k]) for k in ref_weights)  # another run, not the same


@pytest.mark.parametrize("loss", ["policy_loss=gspo", "policy_loss=cispo", "clip_range_high=0.28"])
def test_the_loss_variants_train_through_the_loop(upstream, in_place, loss):
    """Each variant trains. Where the PPO run clipped nothing, CISPO (weight capped at 5) and clip-higher give
    PPO's gradients exactly, so the same weights; GSPO's one ratio per sequence gives other ones."""
    overrides = [f"stages.grpo.{loss}"] + (["stages.grpo.clip_range_high=4.0"] if "cispo" in loss else [])
    rows, weights, _ = run_grpo(upstream, *overrides)
    assert all(torch.isfinite(torch.tensor(r["policy/loss"])) for r in rows)
    assert any(not torch.equal(weights[k], v) for k, v in _sft(upstream).items())  # it trained
    ref_rows, ref_weights, _ = in_place
    assert all(r["policy/clipfrac"] == 0 for r in ref_rows)  # the premise of the comparison below
    same = all(torch.allclose(weights[k], ref_weights[k], atol=1e-6) for k in ref_weights)
    assert same == (loss != "policy_loss=gspo")


def test_each_sampler_reaches_generate_and_trains(upstream, in_place, monkeypatch):
    """The default run (`in_place`) draws every rollout through the inverse CDF and `sampler: multinomial`
    through transformers' own (tests/test_sampling.py checks every sampler's distribution): other draws, and
    the policy trains with each."""
    import rlhf.engines

    seen, real = [], rlhf.engines.generate
    monkeypatch.setattr(rlhf.engines, "generate", lambda *a, **k: seen.append(k["sampler"]) or real(*a, **k))
    rows, weights, _ = run_grpo(upstream, "stages.grpo.sampler=multinomial")
    assert len(seen) == 3 and set(seen) == {"multinomial"}  # one rollout per step, none by the default
    seen.clear()
    run_grpo(upstream, "stages.grpo.num_steps=1")
    assert seen == ["inverse_cdf"]  # the default
    assert any(not torch.equal(weights[k], v) for k, v in _sft(upstream).items())
    ref_rows, _, _ = in_place
    assert [r["env/score"] for r in rows] != [r["env/score"] for r in ref_rows]


@pytest.mark.parametrize("stage_name, lora", [("grpo", False), ("grpo", True), ("ppo", False)])
def test_reuse_rollout_forward_trains_on_the_rollouts_forward(upstream, monkeypatch, stage_name, lora):
    """With one epoch of one minibatch (no accumulation) and `reuse_rollout_forward`, the update takes the graph
    of the rollout's policy forward instead of running a second one: one policy forward per step instead of
    two, the first ratio exactly 1, and the same weights as the two-forward loop to float rounding (the
    gradient sums the tokens in another order). PPO too: its value model is left alone; and with LoRA, whose
    reference forward is the same model with its adapters switched off. `sampler_logprobs` saves the same
    forward another way (the sampler's log-probabilities as the old ones) to the same weights."""
    import rlhf.rollout

    calls, real = [], rlhf.rollout.policy_forward

    def counting(*a, **k):
        calls.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr("stages.ppo.policy_forward", counting)  # the reference's, the rollout's, the update's
    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    run = [*small_rl_run(stage_name, prompts, num_steps=3, num_minibatches=1, ppo_epochs=1),
           *([f"stages.{stage_name}.rewards={{reward: 1.0, conftest:length_judge: 0.1}}",
              f"stages.{stage_name}.no_eos_score=null"] if stage_name == "grpo" else []),
           *([f"stages.{stage_name}.lora.enabled=true", f"stages.{stage_name}.learning_rate=0.01"] if lora else [])]

    def train(reuse: bool, sampler_logprobs: bool = False):
        from transformers import AutoModelForCausalLM

        calls.clear()
        pipe = Pipeline(load_experiment(upstream, [*run, f"stages.{stage_name}.reuse_rollout_forward={reuse}",
                                                   f"stages.{stage_name}.sampler_logprobs={sampler_logprobs}"]))
        result = {r.name: r for r in pipe.run(until=stage_name)}[stage_name]
        out = pipe.store.local_dir(result.key)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "env/score" in line]
        return list(calls), rows, AutoModelForCausalLM.from_pretrained(out).state_dict()

    kept_calls, kept_rows, kept = train(True)
    two_calls, two_rows, two = train(False)
    # per step: the reference's forward (no grad), the rollout's policy forward, then the update's where the
    # rollout's is not kept; the evaluation's forwards come after the 3 steps
    assert kept_calls[:6] == [False, True] * 3
    assert two_calls[:9] == [False, False, True] * 3
    assert all(r["policy/ratio"] == 1.0 and r["policy/clipfrac"] == 0 for r in kept_rows)
    for k in two:
        assert torch.allclose(kept[k], two[k], atol=1e-6), k
    if stage_name == "grpo":  # PPO's sampler logprobs: tests/test_ppo.py
        # with the sampler's logprobs no rollout forward at all; its logits come from cached decoding, so
        # the first ratios are 1 to float rounding only
        sampled_calls, sampled_rows, sampled = train(False, sampler_logprobs=True)
        assert sampled_calls[:6] == [False, True] * 3
        assert all(abs(r["policy/ratio"] - 1.0) < 1e-5 and r["policy/clipfrac"] == 0 for r in sampled_rows)
        for k in two:
            assert torch.allclose(sampled[k], two[k], atol=1e-5), k
    assert any(not torch.equal(two[k], v) for k, v in _sft(upstream).items())  # it trained


@pytest.mark.parametrize("stage_name, overrides, message", [
    ("grpo", ["num_minibatches=2"], "needs the update to be one pass over the whole rollout batch"),
    ("dapo", ["num_minibatches=1"], "joins the rows of several rollouts"),
])
def test_reuse_rollout_forward_is_refused_where_no_one_forward_covers_the_update(upstream, stage_name, overrides,
                                                                                message):
    from rlhf.config import ConfigError

    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    run = [*small_rl_run(stage_name, prompts), f"stages.{stage_name}.reuse_rollout_forward=true",
           *(f"stages.{stage_name}.{o}" for o in overrides)]
    with pytest.raises(ConfigError, match=message):
        load_experiment(upstream, run)


def test_reuse_rollout_forward_by_default_where_one_forward_covers_the_update(upstream, monkeypatch):
    """Unset, the setting resolves when the config loads: on for one epoch of one minibatch (keyed, so such runs
    get new keys), off otherwise and for DAPO (unkeyed: the keys of runs made before it existed); under
    several processes the stage turns an unset one off and refuses a required one."""
    from rlhf.errors import StageError
    from rlhf.launch import RLLaunch
    from rlhf.schema import result_config

    prompts = load_experiment(upstream).stages["ppo"].config.prompts
    config = functools.partial(rl_config, upstream)

    one = config("grpo", "num_minibatches=1")
    assert one.reuse_rollout_forward is True and not one.reuse_required
    assert result_config(one)["reuse_rollout_forward"] is True
    for c in (config("grpo"), config("dapo", "num_minibatches=1"), config("grpo", "num_minibatches=1",
                                                                           "reuse_rollout_forward=false")):
        assert c.reuse_rollout_forward is False and "reuse_rollout_forward" not in result_config(c)
    assert config("grpo", "num_minibatches=1", "reuse_rollout_forward=true").reuse_required

    monkeypatch.setattr(RLLaunch, "num_processes", property(lambda self: 2))
    for required, overrides in ((False, []), (True, ["reuse_rollout_forward=true"])):
        stage = Pipeline(load_experiment(upstream, [*small_rl_run("grpo", prompts), "stages.grpo.num_minibatches=1",
                                                    *(f"stages.grpo.{o}" for o in overrides)])).stages["grpo"]
        stage.work_dir = stage.store.work_dir(stage.key)
        if required:
            with pytest.raises(StageError, match="runs in one process without DeepSpeed"):
                stage.setup()
        else:
            stage.setup()
            assert stage.reuses_rollout_forward is False


def test_sampler_logprobs_by_default_where_the_policy_itself_samples_in_float32(upstream):
    """Unset, `sampler_logprobs` resolves when the config loads: on where the hf engine samples with the training
    policy itself in float32 and no kept forward gives the old logprobs already (keyed, so such runs get new
    keys); off otherwise (unkeyed: the keys of runs made before it existed); required where it cannot hold,
    it is refused before anything trains, naming why."""
    from rlhf.config import ConfigError
    from rlhf.schema import result_config

    config = functools.partial(rl_config, upstream)

    for on in (config("ppo"), config("grpo"), config("dapo")):
        assert on.sampler_logprobs is True and result_config(on)["sampler_logprobs"] is True
    off = {"kept forward": config("grpo", "num_minibatches=1"), "bf16": config("ppo", "bf16_sampling=true"),
           "a copy ahead": config("ppo", "max_staleness=1"), "asked": config("ppo", "sampler_logprobs=false")}
    for why, c in off.items():
        assert c.sampler_logprobs is False and "sampler_logprobs" not in result_config(c), why
    for overrides, message in ((["bf16_sampling=true"], "bf16_sampling: true samples in bfloat16"),
                               (["max_staleness=1"], "max_staleness: 1 samples with older weights"),
                               (["num_minibatches=1", "ppo_epochs=1", "reuse_rollout_forward=true"],
                                "the kept forward gives the old log-probabilities")):
        with pytest.raises(ConfigError, match=message):
            config("ppo", "sampler_logprobs=true", *overrides)


def test_share_prompts_by_default_for_groups_and_only_with_packing(upstream):
    """Unset, `share_prompts` is on where rows share prompts (samples_per_prompt > 1) and the forwards are
    packed, keyed; off otherwise, unkeyed (PPO's keys stay); required without packing, refused."""
    from rlhf.config import ConfigError
    from rlhf.schema import result_config

    config = functools.partial(rl_config, upstream)

    for on in (config("grpo"), config("dapo"), config("ppo", "estimator=rloo", "whiten_advantages=false")):
        assert on.share_prompts is True and result_config(on)["share_prompts"] is True
    for off in (config("ppo", "samples_per_prompt=1"), config("grpo", "pack_sequences=false"),
                config("grpo", "share_prompts=false")):
        assert off.share_prompts is False and "share_prompts" not in result_config(off)
    with pytest.raises(ConfigError, match="needs pack_sequences: true"):
        config("grpo", "share_prompts=true", "pack_sequences=false")


def test_shared_prefill_by_default_for_groups_trains_as_without_it(upstream, monkeypatch):
    """A GRPO run (groups of a prompt) prefills each prompt once by default; `shared_prefill: false`
    reaches `generate`, samples the same tokens (the same scores, step by step) and trains the same weights to
    float rounding (the first token's logits come from a one-token step). Keyed where on, so runs made before
    the default keep their keys; off without groups and with vLLM, where true is refused before anything
    trains; under FSDP the default is left off and true refused."""
    import rlhf.engines
    from rlhf.config import ConfigError
    from rlhf.schema import result_config
    from rlhf.stage import StageError

    seen, real = [], rlhf.engines.generate
    monkeypatch.setattr(rlhf.engines, "generate", lambda *a, **k: seen.append(k["shared_prefill"]) or real(*a, **k))
    # under the Gumbel sampler, whose draws float rounding leaves alone (the inverse CDF's it moves now and
    # then: docs/stages.md), so that the comparison holds on any CPU
    rows, weights, _ = run_grpo(upstream, "stages.grpo.shared_prefill=false", "stages.grpo.sampler=gumbel")
    ref_rows, ref_weights, _ = run_grpo(upstream, "stages.grpo.sampler=gumbel")
    assert seen == [False] * 3 + [True] * 3
    assert [r["env/score"] for r in rows] == [r["env/score"] for r in ref_rows]
    assert all(torch.allclose(weights[k], ref_weights[k], atol=1e-5) for k in ref_weights)
    assert any(not torch.equal(weights[k], ref_weights[k]) for k in ref_weights)  # the premise: they are two runs
    assert result_config(rl_config(upstream, "grpo"))["shared_prefill"] is True
    for off in (rl_config(upstream, "grpo", "shared_prefill=false"), rl_config(upstream, "ppo", "samples_per_prompt=1"),
                rl_config(upstream, "grpo", "rollout_engine=vllm")):
        assert off.shared_prefill is False and "shared_prefill" not in result_config(off)
    with pytest.raises(ConfigError, match="shared_prefill: true applies to rollout_engine: hf"):
        rl_config(upstream, "grpo", "shared_prefill=true", "rollout_engine=vllm")
    for setting, on in ((), True), (("stages.grpo.shared_prefill=true",), None):
        stage = Pipeline(load_experiment(upstream, grpo(upstream, *setting))).stages["grpo"].open(tracking=False)
        monkeypatch.setattr(stage.launch, "generate_extra", lambda: {"synced_gpus": True})  # as FSDP's launch
        if on is None:
            with pytest.raises(StageError, match="shared_prefill: true under FSDP"):
                stage.build_engine()
        else:
            assert stage.build_engine().settings.shared_prefill is False


def test_the_plan_refuses_cispo_without_its_cap_and_an_engine_that_is_not_installed(upstream, capsys):
    from rlhf.cli import main

    assert main(["plan", str(upstream), "--until", "grpo", *grpo(upstream, "stages.grpo.policy_loss=cispo")]) != 0
    assert "caps its importance weight at 1 + clip_range_high" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert main(["plan", str(upstream), "--until", "grpo", *grpo(upstream, "stages.grpo.rollout_engine=vllm")]) != 0
        assert "stages.grpo.rollout_engine: vllm is not installed" in capsys.readouterr().err
        assert main(["plan", str(upstream), "--until", "grpo", *grpo(upstream, "evaluation.engine=vllm")]) != 0
        assert "evaluation.engine: vllm is not installed" in capsys.readouterr().err
