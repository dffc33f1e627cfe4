"""Supervised fine-tuning: teach the pretrained model to answer prompts through the chat template.

In:  a causal LM (the `pretrain` artifact, a hub id or a local HF directory) and prompt/response pairs.
Out: a policy artifact (LoRA merged if used; the adapter kept in `adapter/`), with held-out loss and
     perplexity and the experiment's shared evaluation of the policy (task success, judges, diversity,
     samples; sampled and greedy). A policy that never stops is useless to PPO, so an EOS rate below
     `min_eos_rate` fails the stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rlhf.schema import checked
from rlhf.data import load_rows, to_messages
from rlhf.evaluation import summarize
from rlhf.models import LoraSettings, load_causal_lm
from rlhf.policy import PolicyStage
from rlhf.tracking import trainer_callback
from rlhf.trainers import LR_SCHEDULERS, TrainerSettings, TrainerStage, fused_lm_head_wanted, trainer_arguments

log = logging.getLogger("rlhf")


@dataclass
class SFTConfig(TrainerSettings):
    """The SFT stage's settings; the Trainer's (`max_steps`, `batch_size`, `learning_rate`, ...) come from
    `TrainerSettings`."""

    model: str = "pretrain"
    """Starting model: an upstream stage name, a hub id (`owner/name`) or a local HF directory."""
    train_data: str = "data/sft/train.jsonl.gz"
    """Training pairs: {"prompt","response"} or {"messages"} rows (local file or hub dataset)."""
    eval_data: str = "data/sft/valid.jsonl.gz"
    """Held-out pairs for loss and perplexity (samples, task success and the EOS rate come from the
    experiment's `evaluation:` prompts)."""
    max_examples: int | None = checked(None, ge=1)
    """Train on at most this many pairs (None: all)."""
    max_length: int = checked(128, ge=2)
    """Longest tokenized example; longer ones are truncated."""
    packing: bool = False
    """Pack several examples into one sequence (TRL's best-fit packing)."""
    group_by_length: bool = False
    """Batch examples of similar length together (`train_sampling_strategy="group_by_length"`): less
    padding, so faster steps on short, uneven examples; batches are then less random."""
    lr_scheduler_type: str = checked("cosine", choices=LR_SCHEDULERS)
    """Learning-rate schedule after warmup, a transformers `SchedulerType` (cosine, linear, constant, ...)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Train LoRA adapters instead of all weights (merged into the artifact afterwards)."""
    fused_lm_head: bool | None = None
    """TRL's fused LM-head loss, which never builds the whole logits tensor: None uses it on GPUs only. Without
    Triton (CPU) it scores every position, prompt and padding included, in tiles: 0.34 s a step against the
    model's own cross-entropy's 0.22 s on the default experiment's model, the same loss to every printed
    digit. The plain loss drops TRL's entropy and token-accuracy logs, and rounds differently."""
    eval_examples: int = checked(512, ge=1)
    """Held-out pairs used for loss and perplexity."""
    min_eos_rate: float = checked(0.8, ge=0, le=1)
    """Fail the stage when fewer of the evaluation's sampled responses than this end with EOS (lower it
    only on purpose)."""


def _plain_loss_trainer() -> type:
    from transformers import Trainer
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """`trl.SFTTrainer` with the model's own loss (`Trainer.compute_loss`) instead of TRL's fused LM head:
        the same assistant-only labels and token-count normalisation, faster where Triton is missing. It
        keeps TRL's `num_tokens` log (tokens trained on so far); entropy and token accuracy need the fused
        head's outputs and are not logged."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            if mode == "train":  # counted as TRL's own compute_loss counts them
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return out

    return PlainLossSFTTrainer


class SFTStage(TrainerStage, PolicyStage):
    """Supervised fine-tuning with `trl.SFTTrainer`, loss on assistant tokens only."""

    name = "sft"
    config_class = SFTConfig
    inputs = {"model": "pretrain"}
    data_schemas = {"train_data": "sft", "eval_data": "sft"}

    def data_files(self):
        c = self.config
        return {"train": c.train_data, "eval": c.eval_data}

    # -- override points --------------------------------------------------------------------------

    def build_model(self):
        """The starting model and tokenizer (pad token added and embeddings resized if it had none)."""
        return load_causal_lm(self.input_path("model"))

    def build_dataset(self):
        """(train, eval) datasets of chat `messages`, so the template's assistant mask drives the loss."""
        c = self.config
        train = load_rows(c.train_data, "sft", limit=c.max_examples)
        evals = load_rows(c.eval_data, "sft", limit=c.eval_examples)
        return (train.map(to_messages, remove_columns=train.column_names, desc="chat format"),
                evals.map(to_messages, remove_columns=evals.column_names, desc="chat format"))

    def build_trainer(self):
        """The `trl.SFTTrainer` (checkpoints under the work directory; the plain loss per `fused_lm_head`)."""
        from trl import SFTConfig as TRLSFTConfig
        from trl import SFTTrainer

        c = self.config
        args = trainer_arguments(
            TRLSFTConfig, self,
            lr_scheduler_type=c.lr_scheduler_type,
            max_length=c.max_length,
            packing=c.packing,
            train_sampling_strategy="group_by_length" if c.group_by_length else "random",
            assistant_only_loss=True,
        )
        trainer_class = SFTTrainer if fused_lm_head_wanted(c.fused_lm_head) else _plain_loss_trainer()
        return trainer_class(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            peft_config=c.lora.peft_config() if c.lora.enabled else None,
            callbacks=[trainer_callback(self.tracker)],
        )

    def prepare(self) -> None:
        self.train_ds, self.eval_ds = self.build_dataset()
        self.start_evaluation()

    def describe(self) -> str:
        return f", {len(self.train_ds)} training pairs"

    # -- lifecycle --------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        loss = self.trainer.evaluate()["eval_loss"]
        results = self.evaluation.run(self.model, self.tokenizer)
        metrics = {"eval_loss": loss, "perplexity": math.exp(loss), "eval_prompts": len(self.evaluation.prompts),
                   **summarize(results, self.evaluation.roles)}
        self.tracker.log(metrics, step=self.trainer.state.global_step)
        metrics["samples"] = self.evaluation.samples(results)
        log.info("%s: held-out perplexity %.2f; %s", self.stage_name, metrics["perplexity"], self.headline(metrics))
        self.require_eos(metrics, f"A policy that does not stop gives RL nothing to score; train longer "
                         f"(stages.{self.stage_name}.max_steps), check that responses end with EOS, or lower the "
                         "floor on purpose.")
        return metrics

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        return (f"perplexity {fmt(m, 'perplexity')}, task success {fmt(m, 'greedy_task', '{:.2f}')} greedy / "
                f"{fmt(m, 'task', '{:.2f}')} sampled, gold {fmt(m, 'gold')}, unique {fmt(m, 'unique_share', '{:.2f}')}, "
                f"EOS rate {fmt(m, 'eos_rate', '{:.2f}')}")

    @classmethod
    def report_section(cls, section):
        from rlhf.report import evaluation_table, samples_table

        m = section.metrics
        return [f"Held-out perplexity {m.get('perplexity', float('nan')):.2f}.", "", *evaluation_table(m),
                *samples_table(m.get("samples", []), [("greedy_response", "greedy"), ("response", "sampled")])]
