"""What the stages that wrap a Hugging Face Trainer share: the Trainer's arguments and the end of the
lifecycle (`TrainerStage`).

A stage's config inherits the settings every Trainer takes alike (`TrainerSettings`: `max_steps`,
`batch_size`, `learning_rate`, ...), so `trainer_arguments` fills them and the stage's `build_trainer` adds
only what is its own. Nothing here knows a particular stage.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlhf.schema import checked, logging_only
from rlhf.stage import Stage

log = logging.getLogger("rlhf")

SAVE_TOTAL_LIMIT = 2
"""Resumable checkpoints kept under a stage's work directory: a kill in the middle of writing the newest
one still leaves a complete one to resume from."""


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
"""The learning-rate schedules a Trainer stage's `lr_scheduler_type` may name (transformers' `SchedulerType`
values that need no further arguments)."""


@dataclass
class TrainerSettings:
    """The settings every Trainer stage's config holds alike: `trainer_arguments` reads them by name.

    A stage's config inherits them (`class SFTConfig(TrainerSettings)`) and redeclares one only to give it
    another default, e.g. `max_steps: int = checked(600, ge=1)` for pretraining.
    """

    max_steps: int = checked(400, ge=1)
    """Optimizer steps."""
    batch_size: int = checked(32, ge=1)
    """Examples (sequences, or pairs for the preference stages) per device per forward pass."""
    gradient_accumulation_steps: int = checked(1, ge=1)
    """Forward passes per optimizer step."""
    learning_rate: float = checked(1e-3, gt=0)
    """Peak learning rate."""
    warmup_steps: int = checked(20, ge=0)
    """Linear warmup steps before the learning-rate schedule."""
    weight_decay: float = checked(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = checked(1.0, ge=0)
    """Gradient clipping norm (0: no clipping)."""
    bf16: bool = False
    """bf16 mixed precision (GPUs that support it; on a CPU, autocast: a LoRA reward-model step of
    SmolLM2-135M, 8 pairs, took 1.8-2.3 s with it against 2.3 s without on AVX512-BF16, one run each)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for about a third more compute (TRL turns it
    on by default; off here, since on the small default models it only costs time)."""
    logging_steps: int = logging_only(10, ge=1)
    """Log training loss every N steps."""
    save_steps: int = logging_only(100, ge=1)
    """Write a resumable checkpoint every N steps."""
    dataset_num_proc: int | None = checked(None, ge=1, affects_result=False)
    """Processes that tokenize the training data before the first step (None: this one). The rows come out
    the same in any number of processes, so it is not part of the artifact key. TRL's preparation of 43,779
    SFT pairs took 18 s in 2 processes on 2 cores against 28 s in one."""


def trainer_arguments(args_class: type, stage: Any, **extra: Any) -> Any:
    """`args_class` (`transformers.TrainingArguments` or a TRL config) for `stage`'s Trainer.

    From `stage.config`, a `TrainerSettings`: `max_steps`, `batch_size` (per device, for training and
    evaluation), `gradient_accumulation_steps`, `learning_rate`, `warmup_steps`, `weight_decay`,
    `max_grad_norm`, `bf16`, `gradient_checkpointing`, `logging_steps`, `save_steps` and, for the TRL
    configs that take it, `dataset_num_proc`. From the stage:
    checkpoints go to `work_dir/checkpoints` (where `last_checkpoint` looks for them) and `seed`
    seeds both the model and the data order. `extra` holds the stage's own arguments (`lr_scheduler_type`,
    `max_length`, ...) and wins over the shared ones.
    """
    from rlhf.distributed import trainer_accelerator_config

    c = stage.config
    shared = dict(
        output_dir=str(stage.work_dir / "checkpoints"),
        max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size,
        per_device_eval_batch_size=c.batch_size,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        learning_rate=c.learning_rate,
        warmup_steps=c.warmup_steps,
        weight_decay=c.weight_decay,
        max_grad_norm=c.max_grad_norm,
        bf16=c.bf16,
        # bf16 on a machine without a GPU: the Trainer autocasts on the CPU only when told it runs there
        use_cpu=c.bf16 and not torch.cuda.is_available(),
        logging_steps=c.logging_steps,
        save_steps=c.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        report_to="none",  # the stage's tracker callback logs (wandb and metrics.jsonl)
        seed=stage.seed,
        data_seed=stage.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config=trainer_accelerator_config(),
    )
    fields = {f.name for f in dataclasses.fields(args_class)}
    # transformers >= 5.20's name (the old one only warns there); .venv-vllm's 5.19 knows only the old one
    shared["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = (
        c.gradient_checkpointing)
    if "dataset_num_proc" in fields:  # TRL's configs, not TrainingArguments
        shared["dataset_num_proc"] = c.dataset_num_proc
    return args_class(**{**shared, **extra})


def fused_lm_head_wanted(setting: bool | None) -> bool:
    """A stage's `fused_lm_head` setting resolved: None means TRL's fused LM head on GPUs only."""
    return setting if setting is not None else torch.cuda.is_available()


def plain_lm_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Replace the fused LM head TRL's preference trainers put on `model` (`trl.trainer.utils.add_fused_lm_head`)
    by the model's own logits and the log-probabilities and entropy every policy stage computes
    (`rlhf.ppo.core`).

    `DPOTrainer` and `KTOTrainer` call their policy and reference with `fused_lm_head=True` and read a
    `FusedCausalLMOutput`: each label's log-probability, and the fields of `outputs` they log (`entropy`,
    `mean_logits`, `is_top1`, `log_sum_sq_probs`). This forward returns the same fields from the model's
    full logits, so the math is the fused head's; the fields other than `log_probs` carry no gradient (the
    trainers detach them); every field is 0 (False) where the label is -100, as TRL's. Without Triton (on a
    CPU) TRL's head scores every position, prompt and padding included, in tiles with a dozen passes over
    each (82 of the 133 s of configs/compare.yaml's 200 DPO steps under a profiler, 2 cores); here the LM head
    and the softmax run from the first answer token of the batch on (`logits_to_keep`). The logits tensor
    built here is the memory the fused head exists to save on a GPU with a large vocabulary.

    Any other call is the model's class's own forward (so hooks that replaced `model.forward` before TRL's
    patch are bypassed); models that return router logits (MoE) keep TRL's head: their auxiliary loss is not
    computed here.
    """
    import functools
    import inspect
    import types

    from trl.trainer.utils import FusedCausalLMOutput

    from rlhf.ppo.core import entropy_from_logits, logprobs_from_logits

    if getattr(model.config.get_text_config(), "output_router_logits", False):
        return
    own = type(model).forward
    parameters = inspect.signature(own).parameters

    @functools.wraps(own)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return own(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        width = labels.shape[1] - 1 if shift_labels is None else shift_labels.shape[1]  # the fields' length: TRL's
        if shift_labels is None:  # position t predicts label t + 1: logits from the first labelled column on
            labelled = (labels[:, 1:] != -100).any(dim=0).nonzero()
            keep = width - int(labelled[0]) if len(labelled) else 1
            if "logits_to_keep" in parameters:  # the LM head and the softmax skip the prompts
                kwargs["logits_to_keep"] = keep + 1
            logits = own(self, *args, **{**kwargs, "use_cache": False}).logits[:, -keep - 1 : -1]
            labels = labels[:, -keep:]
        else:
            logits, labels = own(self, *args, **{**kwargs, "use_cache": False}).logits, shift_labels
        mask = labels != -100
        log_probs = logprobs_from_logits(logits, labels.clamp(min=0)).masked_fill(~mask, 0)  # (B, T)
        extra = {}
        with torch.no_grad():
            if "entropy" in outputs:
                extra["entropy"] = entropy_from_logits(logits).masked_fill(~mask, 0)
            if "mean_logits" in outputs:
                extra["mean_logits"] = logits.float().mean(-1).masked_fill(~mask, 0)
            if "is_top1" in outputs:  # the first maximum, as TRL counts a tie with an earlier token as a miss
                extra["is_top1"] = (logits.argmax(-1) == labels) & mask
            if "log_sum_sq_probs" in outputs:
                logp = torch.log_softmax(logits.float(), dim=-1)
                extra["log_sum_sq_probs"] = torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        fields = {k: torch.nn.functional.pad(v, (width - v.shape[1], 0))  # 0 (False) on the columns skipped
                  for k, v in {"log_probs": log_probs, "label_mask": mask, **extra}.items()}
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, **fields)

    model.forward = types.MethodType(forward, model)


def use_plain_lm_head(trainer, outputs: tuple[str, ...]) -> None:
    """`plain_lm_head` on a TRL preference trainer's policy (the base model under LoRA, where TRL put its
    head), asked for `outputs`, and on its reference model if it holds one (log-probabilities only, as TRL)."""
    model = trainer.model
    plain_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model, outputs)
    if getattr(trainer, "ref_model", None) is not None:
        plain_lm_head(trainer.accelerator.unwrap_model(trainer.ref_model))


def last_checkpoint(directory, stage_name: str) -> str | None:
    """The newest complete Trainer checkpoint (`checkpoint-<step>`) under `directory`, or None.

    A process killed while saving leaves a checkpoint directory without its trainer_state.json (the
    Trainer writes it last); resuming from that would crash, so such directories are skipped.
    """
    import json
    from pathlib import Path

    directory = Path(directory)
    found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True) \
        if directory.is_dir() else []
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            log.warning("%s: skipping incomplete checkpoint %s", stage_name, path.name)
    return None


def uses_lora(stage: Any) -> bool:
    """Whether `stage` trains LoRA adapters: its config's `lora.enabled` (a config without `lora` trains all
    weights)."""
    lora = getattr(stage.config, "lora", None)
    return bool(lora is not None and lora.enabled)


def train_from_last_checkpoint(stage: Any) -> dict[str, float]:
    """Run `stage.trainer`, resuming from the newest complete checkpoint in the work directory if any.

    Returns `train_loss`, `train_steps` and `resumed_from_step` (0 when the run started afresh).
    """
    last = last_checkpoint(stage.work_dir / "checkpoints", stage.stage_name)
    resumed_from = int(last.rsplit("-", 1)[-1]) if last else 0
    if last:
        log.info("%s: resuming from %s (step %d)", stage.stage_name, last, resumed_from)
    out = stage.trainer.train(resume_from_checkpoint=last)
    return {"train_loss": out.training_loss, "train_steps": out.global_step, "resumed_from_step": resumed_from}


def finished_weights(stage: Any) -> tuple[dict | None, torch.nn.Module]:
    """After training: (the gathered state dict or None, the model to save), as `stage.save` needs them.

    Sharded runs (ZeRO-3, FSDP): every rank gathers the weights here, so every rank must call this; the
    main process saves them. Otherwise the state dict is None and the model's own weights are saved.
    With `stage.config.lora.enabled` the adapter is kept in `work_dir/adapter` and the model returned is
    the merged one, so later stages and users get a plain checkpoint.
    """
    from rlhf.distributed import gathered_state_dict
    from rlhf.errors import StageError

    full_state = gathered_state_dict(stage.trainer.accelerator, stage.trainer.model_wrapped)
    model = stage.model
    if uses_lora(stage):
        if full_state is not None:
            raise StageError(f"{stage.stage_name}: LoRA under ZeRO-3 or FSDP is not supported yet; "
                             "launch with DDP or ZeRO-2")
        # Keep the adapter before merging: merging folds it into the base weights and removes it.
        model.save_pretrained(str(stage.work_dir / "adapter"))
        model = model.merge_and_unload()
    return full_state, model


def save_trained(stage: Any, out) -> None:
    """Step 6 of a Trainer stage: write the model `finished_weights` returned (`stage.model`, with the state
    every rank gathered in sharded runs, `stage.full_state`), its tokenizer and, with LoRA, the adapter in
    `adapter/`. A model that generates gets the tokenizer's pad and EOS ids in its generation config, so
    `generate` stops where the pipeline does."""
    import shutil

    from rlhf.models import save_policy

    model, tokenizer, state = stage.model, stage.tokenizer, getattr(stage, "full_state", None)
    if model.can_generate():
        save_policy(model, tokenizer, out, state)
    else:
        model.save_pretrained(str(out), state_dict=state)
        tokenizer.save_pretrained(str(out))
    if uses_lora(stage):
        shutil.copytree(stage.work_dir / "adapter", out / "adapter")


def verify_trained(stage: Any, out, auto_class) -> None:
    """`Stage.verify_saved` of a Trainer stage: `out` (what `save_trained` wrote) loads with `auto_class` and
    holds `stage.model`'s weights (against `stage.full_state` in sharded runs, where no rank has them all)."""
    from rlhf.models import verify_checkpoint

    verify_checkpoint(stage.model, out, auto_class, stage.tokenizer, getattr(stage, "full_state", None))


class TrainerStage(Stage):
    """A stage around a transformers or TRL Trainer, whose ending every such stage shares.

    `setup` (the lifecycle's step 2) builds the model and tokenizer (`build_model`), the data and anything
    else the Trainer needs (`prepare`: by default `self.train_ds, self.eval_sets = self.build_dataset()`),
    then the Trainer (`build_trainer`); with LoRA `self.model` becomes the trainer's PeftModel. `train`
    resumes from the newest complete checkpoint, then gathers sharded weights and merges LoRA (the adapter
    kept in `adapter/`); `save` writes the model, its tokenizer and generation config; `verify_saved`
    reloads it with `auto_class` and compares. A stage writes `build_model`, `build_dataset` (or
    `prepare`), `build_trainer` and `evaluate`.
    """

    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    """The transformers class the artifact loads with."""

    def build_model(self) -> tuple[Any, Any]:
        """(model, tokenizer) to train."""
        raise NotImplementedError

    def build_dataset(self) -> tuple[Any, Any]:
        """(train dataset, held-out dataset or {source: dataset})."""
        raise NotImplementedError

    def build_trainer(self) -> Any:
        """The Trainer, its arguments from `trainer_arguments(<its args class>, self, ...)`."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Between the model and the Trainer: the datasets, and whatever else `build_trainer` reads."""
        self.train_ds, self.eval_sets = self.build_dataset()

    def describe(self) -> str:
        """What the setup log line says after the parameter counts."""
        return f", {len(self.trainer.train_dataset)} training examples"

    def setup(self) -> None:
        from rlhf.distributed import refuse_sharded_lora
        from rlhf.models import count_parameters

        refuse_sharded_lora(self.stage_name, uses_lora(self))  # before training, not after it
        self.model, self.tokenizer = self.build_model()
        self.prepare()
        self.trainer = self.build_trainer()
        self.model = self.trainer.model  # a PeftModel when LoRA is on
        log.info("%s: %d trainable of %d parameters%s", self.stage_name, count_parameters(self.model, True),
                 count_parameters(self.model), self.describe())

    def train(self) -> dict[str, float]:
        metrics = train_from_last_checkpoint(self)
        # Every rank gathers sharded weights (ZeRO-3, FSDP); LoRA is merged, so users get a plain checkpoint.
        self.full_state, self.model = finished_weights(self)
        return metrics

    def save(self, out) -> None:
        save_trained(self, out)

    def verify_saved(self, out) -> None:
        import transformers

        verify_trained(self, out, getattr(transformers, self.auto_class))

    def manifest_extra(self) -> dict[str, Any]:
        from rlhf.tokenizer import tokenizer_facts

        return tokenizer_facts(self.tokenizer)
