"""DPO: its loss and implicit reward as TRL computes them, and the stage (artifact, shared evaluation, gates)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_plain_head_matches_trls, dpo_config, policy_reference_pairs, seeded_store, write_config
from rlhf.config import ConfigError, load_experiment
from rlhf.dpo import implicit_rewards, pair_statistics, sequence_logprobs
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError
from stages.dpo import LOSS_TYPES

BETA = 0.1


def _pipe(path, *overrides):
    return Pipeline(load_experiment(path, list(overrides)))


# ---- the loss and the implicit reward against TRL ------------------------------------------------------


def test_every_loss_trl_offers_is_accepted_and_no_other():
    from trl import DPOConfig

    offered = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert sorted(offered) == sorted(LOSS_TYPES)


@pytest.fixture(scope="module")
def trl_batch(tmp_path_factory):
    """A DPOTrainer over 2-layer policy and reference models of different weights, and one collated batch
    of 4 pairs in the trainer's layout (chosen rows, then rejected rows)."""
    tok, policy, reference, pairs = policy_reference_pairs(4)

    def trainer(loss_type):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, loss_type=[loss_type],
                         per_device_train_batch_size=4, max_length=64, report_to="none", bf16=False,
                         gradient_checkpointing=False)
        return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tok)

    first = trainer("sigmoid")
    batch = first.data_collator([first.train_dataset[i] for i in range(4)])
    return trainer, batch, policy, reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_implicit_rewards_match_trl(trl_batch, loss_type):
    make, batch, policy, reference = trl_batch
    trainer = make(loss_type)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        pi_c, pi_r = sequence_logprobs(policy, *inputs).chunk(2)  # log pi(y|x): summed over response tokens
        ref_c, ref_r = sequence_logprobs(reference, *inputs).chunk(2)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    # implicit reward r = beta * (log pi - log pi_ref), per response; TRL logs the batch means
    r_c, r_r = implicit_rewards(pi_c, ref_c, BETA), implicit_rewards(pi_r, ref_r, BETA)
    assert logged["rewards/chosen"][-1] == pytest.approx(r_c.mean().item(), abs=1e-5)
    assert logged["rewards/rejected"][-1] == pytest.approx(r_r.mean().item(), abs=1e-5)
    stats = pair_statistics(r_c, r_r)
    assert logged["rewards/margins"][-1] == pytest.approx(stats["margin"], abs=1e-5)
    assert logged["rewards/accuracies"][-1] == pytest.approx(stats["accuracy"])
    # the loss by hand, with d = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    d = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":  # DPO: -log sigmoid(beta d)
        expected = -F.logsigmoid(BETA * d)
    elif loss_type == "hinge":  # SLiC: max(0, 1 - beta d)
        expected = torch.relu(1 - BETA * d)
    else:  # IPO, as TRL normalises it: each log-ratio per response token, then (d' - 1/(2 beta))^2
        n_c, n_r = batch["completion_mask"].sum(dim=1).chunk(2)
        expected = ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 * BETA)) ** 2
    assert trl_loss == pytest.approx(expected.mean().item(), rel=1e-5)
    assert d.abs().min() > 0.1  # the check above would pass vacuously at d = 0 for hinge


def test_identical_policy_and_reference_give_ln2_and_zero_rewards(trl_batch):
    make, batch, policy, _ = trl_batch
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        logps = sequence_logprobs(policy, *inputs)
    r_c, r_r = implicit_rewards(logps, logps, BETA).chunk(2)
    # d = 0 -> -log sigmoid(0) = ln 2, whatever the weights; a tie is not a preference (accuracy 0)
    assert (-F.logsigmoid(BETA * (r_c - r_r))).mean().item() == pytest.approx(math.log(2))
    assert pair_statistics(r_c, r_r) == {"accuracy": 0.0, "margin": 0.0}


# ---- the stage -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(shared_data, upstream_store, tmp_path_factory):
    """pretrain -> sft -> preferences, built, in a store of this module's own."""
    root = tmp_path_factory.mktemp("dpo")
    return write_config(root / "exp.yaml", dpo_config(shared_data, str(seeded_store(upstream_store, root))))


def test_trainer_gets_the_stages_settings_and_the_policy_input_as_reference(upstream):
    stage = _pipe(upstream, "stages.dpo.loss_type=robust", "stages.dpo.label_smoothing=0.1").stages["dpo"]
    stage.open(tracking=False)
    args = stage.trainer.args
    assert (args.beta, args.loss_type, args.label_smoothing, args.max_length) == (0.1, ["robust"], 0.1, 64)
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (4, 8, 1e-3)
    assert not args.gradient_checkpointing and not args.bf16  # TRL's DPOConfig turns both on by default
    assert args.output_dir == str(stage.work_dir / "checkpoints")
    assert stage.trainer.ref_model is stage.reference and not any(p.requires_grad for p in stage.reference.parameters())
    policy = {k: v for k, v in stage.model.state_dict().items()}
    assert all(torch.equal(policy[k], v) for k, v in stage.reference.state_dict().items())  # both the SFT policy
    assert set(stage.trainer.eval_dataset) == {"human", "onpolicy"}


def test_dpo_policy_loads_changes_every_weight_and_compares_with_its_reference(upstream):
    from transformers import AutoModelForCausalLM

    pipe = _pipe(upstream)
    results = {r.name: r for r in pipe.run()}
    assert [n for n, r in results.items() if r.ran] == ["dpo"]
    store = pipe.store
    m = store.manifest(results["dpo"].key)
    assert m["kind"] == "policy" and m["inputs"]["policy"]["key"] == results["sft"].key
    assert m["inputs"]["preferences"]["key"] == results["preferences"].key
    metrics = m["metrics"]
    # the names PPO's manifest uses, so the report compares the two
    for k in ("gold", "gold_ref", "gold_gain", "gold_gain_ci", "task", "task_ref", "kl", "unique_share",
              "unique_share_ref", "greedy_gold", "greedy_gold_gain", "eos_rate", "eos_rate_ref", "eval_prompts"):
        assert k in metrics, k
    for source in ("human", "onpolicy"):
        assert 0 <= metrics[f"accuracy_{source}"] <= 1 and f"margin_{source}" in metrics
    assert metrics["eval_pairs_human"] == 40 and metrics["train_steps"] == 4
    assert {"before", "after", "greedy_before", "greedy_after"} <= set(metrics["samples"][0])
    assert "held-out pair accuracy" in m["headline"]
    sft = AutoModelForCausalLM.from_pretrained(store.local_dir(results["sft"].key)).state_dict()
    dpo = AutoModelForCausalLM.from_pretrained(store.local_dir(results["dpo"].key)).state_dict()
    assert [k for k in sft if torch.equal(sft[k], dpo[k])] == []
    rows = [json.loads(line) for line in (store.local_dir(results["dpo"].key) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/kl" in r] == [2]  # eval_every: 2 of 4 steps (the final one is the manifest's)
    assert any("rewards/margins" in r for r in rows)


def test_precomputed_reference_logprobs_train_the_same_policy(upstream):
    pipe = _pipe(upstream)
    plain = pipe.run()[-1]
    pre = _pipe(upstream, "stages.dpo.precompute_ref_log_probs=true")
    stage = pre.stages["dpo"]
    result = pre.run()[-1]
    assert result.key != plain.key
    a, b = (load_state(pipe.store, r.key) for r in (plain, result))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert stage.trainer.ref_model is None  # no reference in memory while training
    m, p = pipe.store.manifest(result.key)["metrics"], pipe.store.manifest(plain.key)["metrics"]
    assert m["accuracy"] == pytest.approx(p["accuracy"]) and m["margin_onpolicy"] == pytest.approx(p["margin_onpolicy"], abs=1e-4)


def load_state(store, key):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(store.local_dir(key)).state_dict()


def test_lora_artifact_is_merged_and_keeps_the_adapter(upstream):
    from transformers import AutoModelForCausalLM

    pipe = _pipe(upstream, "stages.dpo.lora.enabled=true", "stages.dpo.loss_type=ipo")
    result = pipe.run()[-1]
    art = pipe.store.local_dir(result.key)
    assert (art / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(art)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert pipe.store.manifest(result.key)["metrics"]["kl"] != 0  # measured against the policy input


@pytest.mark.parametrize("override, message", [
    ("stages.dpo.min_accuracy=1.0", r"prefers the chosen response on only .* stages\.dpo\.min_accuracy=1\.0"),
    ("stages.dpo.min_eos_rate=1.0", r"end with EOS .* stages\.dpo\.min_eos_rate=1\.0"),
])
def test_gates_fail_the_stage_and_publish_nothing(upstream, override, message):
    pipe = _pipe(upstream, override)
    with pytest.raises(StageError, match=message):
        pipe.run()
    assert not pipe.store.exists(pipe.stages["dpo"].key)


@pytest.mark.parametrize("override, message", [
    ("stages.dpo.loss_type=dpo", r"stages\.dpo\.loss_type: 'dpo' must be one of 'sigmoid', 'hinge', 'ipo'"),
    ("stages.dpo.loss_type=exo_pair", r"stages\.dpo\.label_smoothing: 0\.0; loss_type exo_pair needs it"),
    ("stages.dpo.beta=0", r"stages\.dpo\.beta: 0\.0 must be > 0"),
])
def test_bad_settings_are_refused_when_the_config_loads(upstream, override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(upstream, [override])


def test_on_a_cpu_the_models_own_logits_give_trls_loss_gradient_and_logs(upstream):
    assert_plain_head_matches_trls(upstream, "dpo")
