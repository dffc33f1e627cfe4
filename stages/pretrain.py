"""Pretraining: train a tokenizer and a small Llama model from scratch on raw text.

In:  a text corpus (data/pretrain by default).
Out: a causal-LM artifact (model + tokenizer with chat template + generation config), with held-out
     perplexity before and after training and the unigram baseline of the same tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from rlhf.checkpoints import write_aside, write_atomic
from rlhf.schema import checked
from rlhf.data import load_rows, pack_texts
from rlhf.models import ModelConfig, build_causal_lm, count_parameters, verify_reload
from rlhf.stage import Stage
from rlhf.tokenizer import TokenizerConfig, load_tokenizer, tokenizer_facts, train_tokenizer
from rlhf.tracking import trainer_callback
from rlhf.trainers import TrainerSettings, train_from_last_checkpoint, trainer_arguments

log = logging.getLogger("rlhf")


@dataclass
class PretrainConfig(TrainerSettings):
    """Pretraining's settings; those every Trainer stage shares (`batch_size`, `bf16`, ...) come from
    `TrainerSettings`, with pretraining's own defaults redeclared here."""

    train_data: str = "data/pretrain/train.jsonl.gz"
    """Training corpus: a local text/jsonl file ({"text"} rows) or a hub dataset id."""
    eval_data: str = "data/pretrain/valid.jsonl.gz"
    """Held-out corpus for perplexity."""
    max_documents: int | None = checked(None, ge=1)
    """Use at most this many training documents (None: all)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Byte-level BPE trained on the training corpus."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the model trained from scratch."""
    block_size: int = checked(128, ge=2)
    """Tokens per packed training sequence."""
    max_steps: int = checked(600, ge=1)
    """Optimizer steps."""
    learning_rate: float = checked(3e-3, gt=0)
    """Peak learning rate (tiny models tolerate a high one)."""
    weight_decay: float = checked(0.1, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = checked(30, ge=0)
    """Linear warmup steps before the cosine decay."""
    eval_blocks: int = checked(256, ge=1)
    """Held-out blocks used for perplexity (and the unigram baseline)."""
    eval_batch_size: int = checked(64, ge=1)
    """Sequences per evaluation forward pass."""


class PretrainStage(Stage):
    """Tokenizer + causal-LM pretraining with `transformers.Trainer` on packed blocks."""

    name = "pretrain"
    config_class = PretrainConfig
    kind = "causal-lm"
    inputs: dict[str, str] = {}
    data_schemas = {"train_data": "text", "eval_data": "text"}

    def data_files(self):
        return {"train": self.config.train_data, "eval": self.config.eval_data}

    # -- override points --------------------------------------------------------------------------

    def build_tokenizer(self, texts: list[str]):
        """Train (or, when resuming, reload) the tokenizer; it must not change under a resumed run."""
        saved = self.work_dir / "tokenizer"
        if saved.exists():
            return load_tokenizer(str(saved))
        cfg = self.config.tokenizer
        tok = train_tokenizer(texts[: cfg.max_documents] if cfg.max_documents else texts, cfg)
        with write_aside(saved) as tmp:  # whole or not at all: a resumed run must not load half a tokenizer
            tok.save_pretrained(str(tmp))
        return tok

    def build_model(self):
        """A freshly initialised model sized by `config.model`."""
        return build_causal_lm(self.config.model, self.tokenizer)

    def build_dataset(self):
        """Packed (train, eval) datasets of `block_size`-token blocks."""
        cfg = self.config
        train = pack_texts(self.train_docs, self.tokenizer, cfg.block_size, num_proc=cfg.dataset_num_proc)
        evals = pack_texts(self.eval_docs, self.tokenizer, cfg.block_size)
        return train, evals.select(range(min(cfg.eval_blocks, len(evals))))

    def build_trainer(self):
        """The `transformers.Trainer` that runs the loop (checkpoints under the work directory)."""
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        args = trainer_arguments(TrainingArguments, self, lr_scheduler_type="cosine",
                                 per_device_eval_batch_size=self.config.eval_batch_size)  # perplexity batches
        return Trainer(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            data_collator=DataCollatorForLanguageModeling(self.tokenizer, mlm=False),
            callbacks=[trainer_callback(self.tracker)],
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        self.train_docs = load_rows(cfg.train_data, "text", limit=cfg.max_documents)
        self.eval_docs = load_rows(cfg.eval_data, "text")
        self.tokenizer = self.build_tokenizer(self.train_docs["text"])
        self.model = self.build_model()
        self.train_ds, self.eval_ds = self.build_dataset()
        self.trainer = self.build_trainer()
        log.info(
            "%s: %d parameters, %d training blocks of %d tokens, vocabulary %d", self.stage_name,
            count_parameters(self.model), len(self.train_ds), cfg.block_size, len(self.tokenizer),
        )

    def train(self) -> dict[str, float]:
        # Perplexity of the untrained model is measured once and kept beside the checkpoints,
        # so a resumed run still reports the true starting point.
        before_file = self.work_dir / "before.json"
        if before_file.exists():
            before = json.loads(before_file.read_text())
        else:
            before = {"perplexity_before": math.exp(self.trainer.evaluate()["eval_loss"])}
            write_atomic(before_file, json.dumps(before))
        return {**before, **train_from_last_checkpoint(self), "parameters": count_parameters(self.model)}

    def evaluate(self) -> dict[str, float]:
        loss = self.trainer.evaluate()["eval_loss"]
        unigram = unigram_perplexity(self.train_ds["input_ids"], self.eval_ds["input_ids"], len(self.tokenizer))
        metrics = {"eval_loss": loss, "perplexity": math.exp(loss), "unigram_perplexity": unigram}
        log.info(
            "%s: held-out perplexity %.1f (before training %.1f, unigram baseline %.1f)", self.stage_name,
            metrics["perplexity"], json.loads((self.work_dir / "before.json").read_text())["perplexity_before"], unigram,
        )
        self.tracker.log({"eval/perplexity": metrics["perplexity"], "eval/unigram_perplexity": unigram},
                         step=self.trainer.state.global_step)
        return metrics

    def save(self, out) -> None:
        from transformers import GenerationConfig

        tok = self.tokenizer
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            do_sample=True, max_new_tokens=64,
        )
        self.model.save_pretrained(str(out))
        tok.save_pretrained(str(out))

    def verify_saved(self, out) -> None:
        from transformers import AutoModelForCausalLM

        verify_reload(self.model, out, AutoModelForCausalLM, self.tokenizer)

    def manifest_extra(self):
        return tokenizer_facts(self.tokenizer)

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        return (f"perplexity {fmt(m, 'perplexity')} (unigram {fmt(m, 'unigram_perplexity')}, "
                f"untrained {fmt(m, 'perplexity_before')})")


def unigram_perplexity(train_blocks: list[list[int]], eval_blocks: list[list[int]], vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model on the tokens the LM predicts (all but each block's first).

    The baseline an LM must beat to show it learned anything beyond token frequencies.
    """
    counts = Counter(t for block in train_blocks for t in block)
    total = sum(counts.values()) + vocab_size
    targets = torch.tensor([t for block in eval_blocks for t in block[1:]])
    probs = torch.tensor([(counts.get(i, 0) + 1) / total for i in range(vocab_size)], dtype=torch.float64)
    return math.exp(-probs[targets].log().mean().item())
