"""The reward stage: the pairwise loss as TRL computes it on our model, training, artifacts, gates."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config, write_config, write_jsonl
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError
from stages.reward import RewardStage


def _pipe(path, *overrides):
    return Pipeline(load_experiment(path, list(overrides)))


@pytest.fixture
def reward_yaml(workdir, tiny_data):
    cfg = tiny_config(tiny_data, str(workdir / "store"), stages=("pretrain", "sft", "preferences", "reward"))
    return write_config(workdir / "exp.yaml", cfg)


@pytest.fixture
def reward_setup(reward_yaml, monkeypatch):
    """A reward stage after setup (model, data and TRL trainer built), before training."""
    pipe = _pipe(reward_yaml, "stages.reward.center_rewards_coefficient=null")
    pipe.run(until="preferences")
    return pipe.stages["reward"].open(tracking=False)


def _grad(stage, batch) -> torch.Tensor:
    stage.model.zero_grad()
    stage.trainer.compute_loss(stage.model, dict(batch)).backward()
    return torch.cat([p.grad.flatten() for p in stage.model.parameters() if p.grad is not None])


def test_swapping_chosen_and_rejected_flips_the_gradient(reward_setup):
    stage = reward_setup
    row = stage.trainer.train_dataset[0]
    swapped = {**row, "chosen_ids": row["rejected_ids"], "rejected_ids": row["chosen_ids"]}
    g = _grad(stage, stage.trainer.data_collator([row]))
    g_swapped = _grad(stage, stage.trainer.data_collator([swapped]))
    # loss = -log sigmoid(d), d = r_chosen - r_rejected: grad = -(1 - sigmoid(d)) * grad(d); swapped: sigmoid(d) * grad(d).
    # Both lie along grad(d) with opposite signs, so the cosine is exactly -1.
    cos = torch.nn.functional.cosine_similarity(g, g_swapped, dim=0).item()
    assert cos == pytest.approx(-1.0, abs=1e-5)


def test_identical_pair_gives_ln2(reward_setup):
    stage = reward_setup
    row = stage.trainer.train_dataset[0]
    batch = stage.trainer.data_collator([{**row, "rejected_ids": row["chosen_ids"]}])
    with torch.no_grad():
        loss = stage.trainer.compute_loss(stage.model, dict(batch)).item()
    # d = 0 -> -log sigmoid(0) = ln 2, whatever the (untrained) head outputs
    assert loss == pytest.approx(math.log(2), abs=1e-6)


def test_training_changes_every_parameter_and_artifact_scores_as_in_memory(reward_yaml, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    snapshots = {}
    original_train, original_save = RewardStage.train, RewardStage.save

    def train(self):
        snapshots["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return original_train(self)

    def save(self, out):
        snapshots["model"] = self.model
        original_save(self, out)

    monkeypatch.setattr(RewardStage, "train", train)
    monkeypatch.setattr(RewardStage, "save", save)
    pipe = _pipe(reward_yaml, "stages.reward.max_steps=10", "stages.reward.learning_rate=1e-3")
    results = {r.name: r for r in pipe.run()}
    model = snapshots["model"]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), snapshots["before"][n])]
    assert unchanged == []

    art = pipe.store.local_dir(results["reward"].key)
    reloaded = AutoModelForSequenceClassification.from_pretrained(art).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id is not None
    ids = torch.tensor([[1, 7, 9, 11, 2], [1, 8, 2, 0, 0]])
    mask = (ids != reloaded.config.pad_token_id).long()
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)

    m = pipe.store.manifest(results["reward"].key)
    metrics = m["metrics"]
    for k in ("accuracy", "accuracy_human", "accuracy_onpolicy", "margin_human", "reward_mean", "reward_std"):
        assert k in metrics, k
    assert m["kind"] == "reward-model" and m["tokenizer_digest"] and m["chat_template_digest"]


def test_accuracy_gate_fails_the_stage(reward_yaml):
    # six steps of a 2-layer model do not rank every held-out pair right
    with pytest.raises(StageError, match=r"below stages\.reward\.min_accuracy=1\.0"):
        _pipe(reward_yaml, "stages.reward.min_accuracy=1.0").run()


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, '"chosen" and "rejected" are identical'),
    ({"prompt": "p", "chosen": "ok", "rejected": " "}, '"rejected" is empty'),
])
def test_bad_preference_rows_name_file_and_line(reward_yaml, tiny_data, bad, message):
    from rlhf.data import DataError

    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 3 + [bad]
    path = write_jsonl(tiny_data["prefs_train"], rows)
    with pytest.raises(DataError, match=f"{path} line 4: {message}"):
        _pipe(reward_yaml).run()


def test_policy_with_a_different_tokenizer_is_refused(reward_yaml, workdir):
    pipe = _pipe(reward_yaml)
    pipe.run(until="pretrain")
    # a second pretrained model with its own tokenizer (different vocabulary size)
    other = _pipe(reward_yaml, "stages.pretrain.tokenizer.vocab_size=300")
    other_key = other.run(until="pretrain")[0].key
    other_dir = str(other.store.local_dir(other_key))
    bad = _pipe(reward_yaml, f"stages.reward.policy={other_dir}")
    with pytest.raises(StageError, match="inputs use different tokenizers"):
        bad.run()
