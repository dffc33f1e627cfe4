"""The SFT stage: assistant-only loss, EOS floor, LoRA merged with its adapter kept, outside models as input."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config, write_config
from rlhf.artifacts import ArtifactStore
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.stage import StageError
from stages.sft import SFTStage


def _run(path, *overrides, until=None):
    pipe = Pipeline(load_experiment(path, list(overrides)))
    return pipe, {r.name: r for r in pipe.run(until=until)}


@pytest.fixture
def sft_yaml(workdir, tiny_data):
    return write_config(workdir / "exp.yaml", tiny_config(tiny_data, str(workdir / "store"), stages=("pretrain", "sft")))


def _trainer(sft_yaml, monkeypatch, *overrides):
    seen = {}

    def capture(self):  # stop after setup: the trainer (its prepared dataset, its loss) is what we inspect
        seen["trainer"] = self.trainer
        raise KeyboardInterrupt

    monkeypatch.setattr(SFTStage, "train", capture)
    with pytest.raises(KeyboardInterrupt):
        _run(sft_yaml, *overrides)
    return seen["trainer"]


def test_prompt_tokens_carry_no_loss(sft_yaml, monkeypatch):
    trainer = _trainer(sft_yaml, monkeypatch, "stages.sft.max_length=512")  # no truncation: every row ends with EOS
    tok, ds = trainer.processing_class, trainer.train_dataset
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    for row in ds.select(range(20)):
        ids, labels = row["input_ids"], row["labels"]
        start = ids.index(assistant_id) + 1  # first response token
        # everything up to and including <|assistant|> (BOS, role tokens, the prompt) is masked out ...
        assert all(label == -100 for label in labels[:start])
        # ... and every response token, the closing EOS included, is trained on
        assert labels[start:] == ids[start:] and ids[-1] == tok.eos_token_id


def test_the_plain_loss_equals_trls_fused_lm_head_loss(sft_yaml, monkeypatch):
    """On CPU the stage swaps TRL's fused LM-head loss for the model's own cross-entropy (faster without
    Triton); both are the mean negative log-likelihood of the response tokens, so equal to float rounding.
    A plain loss over every position (prompt tokens unmasked) would differ by far more than that."""
    fused = _trainer(sft_yaml, monkeypatch, "stages.sft.fused_lm_head=true")
    plain = _trainer(sft_yaml, monkeypatch, "stages.sft.fused_lm_head=false")
    assert type(plain).__name__ == "PlainLossSFTTrainer" and type(fused).__name__ == "SFTTrainer"
    batch = next(iter(fused.get_train_dataloader()))
    n = (batch["labels"][:, 1:] != -100).sum()
    for t in (fused, plain):
        t.model.train()  # the training path: the count below is the training tokens'
    losses = [t.compute_loss(t.model, dict(batch), num_items_in_batch=n).item() for t in (fused, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # both log the tokens trained on (padding excluded), as TRL counts them
    counts = [t._metrics["train"]["num_tokens"] for t in (fused, plain)]
    assert counts[0] == counts[1] == [batch["attention_mask"].sum().item()]
    unmasked = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.item()
    assert abs(unmasked - losses[1]) > 1e-2


def test_sft_artifact_metrics_and_input_from_store(sft_yaml):
    pipe, results = _run(sft_yaml)
    store = pipe.store
    m = store.manifest(results["sft"].key)
    assert m["kind"] == "policy"
    assert m["inputs"]["model"] == {"key": results["pretrain"].key, "stage": "pretrain", "external": None}
    metrics = m["metrics"]
    for k in ("eval_loss", "perplexity", "eos_rate", "samples", "train_loss", "task", "greedy_task", "gold",
              "unique_share", "greedy_unique_share", "distinct_2", "top_share",
              "template_top_share", "greedy_template_top_share"):
        assert k in metrics
    assert 0.0 <= metrics["eos_rate"] <= 1.0 and len(metrics["samples"]) == 2
    assert set(metrics["samples"][0]) == {"prompt", "response", "greedy_response"}
    assert m["headline"].startswith("perplexity ") and "task success" in m["headline"]
    assert m["tokenizer_digest"] == store.manifest(results["pretrain"].key)["tokenizer_digest"]


def test_eos_floor_fails_the_stage_and_publishes_nothing(sft_yaml):
    # eight SFT steps of a 2-layer model cannot make every sample stop within 8 tokens
    with pytest.raises(StageError, match=r"end with EOS.*min_eos_rate=1\.0"):
        _run(sft_yaml, "stages.sft.min_eos_rate=1.0", "evaluation.max_new_tokens=2")
    store = ArtifactStore(str(sft_yaml.parent / "store"))
    assert [store.manifest(k)["stage"] for k in store.keys()] == ["pretrain"]


def test_lora_artifact_is_merged_and_keeps_adapter(sft_yaml):
    from transformers import AutoModelForCausalLM

    pipe, results = _run(sft_yaml, "stages.sft.lora.enabled=true", "stages.sft.lora.r=4")
    art = pipe.store.local_dir(results["sft"].key)
    assert (art / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(art)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain checkpoint
    base = AutoModelForCausalLM.from_pretrained(pipe.store.local_dir(results["pretrain"].key))
    diffs = [(merged.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items()]
    assert max(diffs) > 0  # the adapter's update was folded into the weights

    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(base, str(art / "adapter")).merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-5)


def test_sft_from_a_local_model_directory_skips_pretraining(workdir, tiny_data, sft_yaml):
    pipe, results = _run(sft_yaml, until="pretrain")
    local_model = str(pipe.store.local_dir(results["pretrain"].key))
    cfg = tiny_config(tiny_data, str(workdir / "store2"), stages=("sft",))
    cfg["stages"]["sft"]["model"] = local_model  # what a user does with a released model
    path = write_config(workdir / "from_dir.yaml", cfg)
    pipe2, results2 = _run(path)
    assert list(results2) == ["sft"]
    m = pipe2.store.manifest(results2["sft"].key)
    assert m["inputs"]["model"]["external"] == local_model and m["inputs"]["model"]["key"].startswith("dir:")


def test_input_naming_a_stage_missing_from_the_experiment_is_an_error(workdir, tiny_data):
    from rlhf.config import ConfigError

    cfg = tiny_config(tiny_data, str(workdir / "store"), stages=("sft",))  # model: pretrain, but no pretrain block
    path = write_config(workdir / "e.yaml", cfg)
    with pytest.raises(ConfigError, match=r"stages\.sft\.model = 'pretrain' names a stage that is not in this experiment"):
        Pipeline(load_experiment(path))
