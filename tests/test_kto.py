"""KTO: its loss as TRL computes it, derived by hand, and the stage: a policy stage written against
rlhf/policy.py alone, evaluated and reported like DPO."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_plain_head_matches_trls, dpo_config, policy_reference_pairs, seeded_store, write_config
from rlhf.config import ConfigError, load_experiment
from rlhf.dpo import sequence_logprobs
from rlhf.pipeline import Pipeline

BETA = 0.1

KTO_BLOCK = {"class": "stages.kto:KTOStage", "max_length": 64, "max_steps": 4, "batch_size": 8, "warmup_steps": 1,
             "learning_rate": 1e-3, "eval_every": 2}


# ---- the loss against TRL ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_batch(tmp_path_factory):
    """A KTOTrainer over 2-layer policy and reference models of different weights, and one collated batch
    of 4 unpaired examples (the chosen and rejected answers of 2 pairs) with their mismatched KL rows."""
    from trl.data_utils import unpair_preference_dataset

    tok, policy, reference, pairs = policy_reference_pairs(2)
    examples = unpair_preference_dataset(pairs)

    def trainer(**weights):
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, per_device_train_batch_size=4,
                         max_length=64, report_to="none", bf16=False, gradient_checkpointing=False,
                         train_sampling_strategy="sequential", **weights)
        return KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=examples, processing_class=tok)

    first = trainer()
    batch = first.data_collator([first.train_dataset[i] for i in range(4)])
    return trainer, batch, policy, reference


@pytest.mark.parametrize("desirable, undesirable", [(1.0, 1.0), (1.0, 1.5)])
def test_loss_matches_trl(trl_batch, desirable, undesirable):
    make, batch, policy, reference = trl_batch
    trainer = make(desirable_weight=desirable, undesirable_weight=undesirable)
    main = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    mismatched = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        # r = log pi(y|x) - log pi_ref(y|x) of each example, summed over its answer's tokens
        r = sequence_logprobs(policy, *main) - sequence_logprobs(reference, *main)
        # z0, the reference point: the batch's estimate of KL(pi || pi_ref), the mean log-ratio of its answers
        # given to other prompts (y' of x), clamped at 0 and not differentiated
        z = (sequence_logprobs(policy, *mismatched) - sequence_logprobs(reference, *mismatched)).mean().clamp(min=0)
    label = torch.as_tensor(batch["label"], dtype=torch.bool)
    # Ethayarajh et al. 2024, eq. 7 without the lambda-weighted value offset: a desirable answer loses
    # 1 - sigmoid(beta (r - z0)), an undesirable one 1 - sigmoid(beta (z0 - r)); the batch's mean
    expected = torch.cat([desirable * (1 - torch.sigmoid(BETA * (r[label] - z))),
                          undesirable * (1 - torch.sigmoid(BETA * (z - r[~label])))]).mean()
    assert trl_loss == pytest.approx(expected.item(), rel=1e-5)
    # neither term may vanish, or the check above would not see it: z0 > 0 and log-ratios far from z0
    assert z > 0.05 and (r - z).abs().min() > 0.1 and label.sum() == 2
    # with identical weights every example's loss would be 1 - sigmoid(0) = 0.5: this one is not
    assert abs(trl_loss - 0.5 * (desirable + undesirable) / 2) > 1e-3


def test_each_pair_becomes_a_desirable_and_an_undesirable_example(trl_batch):
    make, batch, *_ = trl_batch
    ds = make().train_dataset
    assert len(ds) == 4 and sorted(ds["label"]) == [False, False, True, True]


# ---- the stage -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(shared_data, upstream_store, tmp_path_factory):
    """pretrain -> sft -> preferences, built, in a store of this module's own, with a KTO stage after them."""
    root = tmp_path_factory.mktemp("kto")
    cfg = dpo_config(shared_data, str(seeded_store(upstream_store, root)))
    cfg["stages"]["kto"] = cfg["stages"].pop("dpo") | KTO_BLOCK
    for key in ("loss_type", "min_accuracy", "precompute_ref_log_probs", "label_smoothing"):
        cfg["stages"]["kto"].pop(key, None)
    return write_config(root / "exp.yaml", cfg)


def test_kto_trains_and_is_evaluated_and_reported_like_every_policy(upstream, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from rlhf.cli import main as rlhf_main
    from rlhf.report import write_report

    pipe = Pipeline(load_experiment(upstream))
    results = {r.name: r for r in pipe.run()}
    assert [n for n, r in results.items() if r.ran] == ["kto"]
    store = pipe.store
    m = store.manifest(results["kto"].key)
    assert m["kind"] == "policy" and m["inputs"]["policy"]["key"] == results["sft"].key
    metrics = m["metrics"]
    # the policy stages' shared names (rlhf/policy.py), as DPO's and PPO's manifests hold them
    for k in ("gold", "gold_ref", "gold_gain", "gold_gain_ci", "task", "task_ref", "kl", "unique_share",
              "unique_share_ref", "greedy_gold", "greedy_gold_gain", "eos_rate", "eos_rate_ref", "eval_prompts"):
        assert k in metrics, k
    assert metrics["kl"] != 0 and metrics["train_steps"] == 4  # measured against the policy input
    assert metrics["train_examples"] == 2 * len((store.local_dir(results["preferences"].key) / "train.jsonl")
                                                .read_text().splitlines())
    assert metrics["loss_human"] > 0 and "loss_onpolicy" in metrics
    assert {"before", "after", "greedy_before", "greedy_after"} <= set(metrics["samples"][0])
    sft = AutoModelForCausalLM.from_pretrained(store.local_dir(results["sft"].key)).state_dict()
    kto = AutoModelForCausalLM.from_pretrained(store.local_dir(results["kto"].key)).state_dict()
    assert [k for k in sft if torch.equal(sft[k], kto[k])] == []
    rows = [json.loads(line) for line in (store.local_dir(results["kto"].key) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/kl" in r] == [2]  # eval_every: 2 of 4 steps
    assert any("kl" in r and "loss" in r for r in rows)  # TRL's training log: loss and its KL estimate
    # the report compares it with its reference, as it does DPO
    report, *_ = write_report(store, pipe.experiment, tmp_path / "report")
    text = report.read_text()
    assert "## kto" in text and "kto_overoptimisation.png" in text and "held-out human examples: KTO loss" in text
    # the manifest records the evaluation it was measured with, so the plan names a change of it
    assert m["evaluation"]["max_new_tokens"] == 8
    capsys.readouterr()
    assert rlhf_main(["plan", str(upstream), "evaluation.max_new_tokens=9"]) == 0
    out = capsys.readouterr().out  # SFT, a policy stage too, says why; everything after it follows its input
    assert re.search(r"sft +\w+ +will run +changed since \w+: evaluation\.max_new_tokens 8 -> 9", out)
    assert re.search(r"kto +\w+ +will run +input preferences, sft will run", out)


@pytest.mark.parametrize("override, message", [
    ("stages.kto.batch_size=1", r"stages\.kto\.batch_size: 1 must be >= 2; KTO estimates its KL term"),
    ("stages.kto.beta=0", r"stages\.kto\.beta: 0\.0 must be > 0"),
    ("stages.kto.undesirable_weight=0", r"stages\.kto\.undesirable_weight: 0\.0 must be > 0"),
])
def test_bad_settings_are_refused_when_the_config_loads(upstream, override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(upstream, [override])


def test_eos_floor_fails_the_stage_and_publishes_nothing(upstream):
    from rlhf.stage import StageError

    pipe = Pipeline(load_experiment(upstream, ["stages.kto.min_eos_rate=1.0", "stages.kto.max_steps=2"]))
    with pytest.raises(StageError, match=r"end with EOS .* stages\.kto\.min_eos_rate=1\.0"):
        pipe.run()
    assert not pipe.store.exists(pipe.stages["kto"].key)


def test_on_a_cpu_the_models_own_logits_give_trls_loss_gradient_and_logs(upstream):
    assert_plain_head_matches_trls(upstream, "kto")
