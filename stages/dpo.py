"""DPO: optimise the policy on preference pairs directly, without a reward model or sampling during
training (Rafailov et al. 2023).

In:  the `sft` policy, which is also the reference the loss holds the policy near, and preference pairs:
     a preferences stage's dataset (stages/preferences.py), preference files or hub datasets.
Out: a policy artifact like PPO's (AutoModelForCausalLM; LoRA merged, the adapter kept in `adapter/`), with
     held-out preference accuracy and implicit-reward margins per source, and the experiment's shared
     evaluation of the reference (SFT) policy and of this policy on the same held-out prompts: the same
     metric names as PPO's manifest (gold, gold_ref, gold_gain, gold_gain_ci, task, kl, unique_share, ...),
     so the report sets the methods side by side.

Training is `trl.DPOTrainer` with any of its losses (`loss_type`: sigmoid is DPO's, ipo, hinge, robust,
...). The reference is the policy input: a frozen copy in memory, its logprobs of every pair computed once
before training (`precompute_ref_log_probs`), or with LoRA the policy with its adapters disabled. A policy
that prefers the rejected response of held-out pairs, or that stops ending its answers, fails the stage
(`min_accuracy`, `min_eos_rate`) and nothing is published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhf.schema import checked
from rlhf.dpo import implicit_rewards, pair_statistics, sequence_logprobs
from rlhf.errors import StageError
from rlhf.models import load_causal_lm
from rlhf.policy import PolicyStage
from rlhf.preferences import LearnsFromPairs, PairPolicySettings
from rlhf.tracking import trainer_callback
from rlhf.trainers import TrainerStage, fused_lm_head_wanted, trainer_arguments, use_plain_lm_head

log = logging.getLogger("rlhf")

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The losses `trl.DPOConfig.loss_type` accepts in TRL 1.16 (tests/test_dpo.py checks the list against
the installed TRL)."""


@dataclass
class DPOConfig(PairPolicySettings):
    """The DPO stage's settings: its loss's, beside those of every pair-learning policy stage
    (`PairPolicySettings`: policy, pairs, schedule, LoRA, EOS floor) and the Trainer's."""

    loss_type: str = checked("sigmoid", choices=LOSS_TYPES)
    """TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot,
    aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm."""
    beta: float = checked(0.1, gt=0)
    """Strength of the pull towards the reference (higher: closer); IPO's tau."""
    label_smoothing: float = checked(0.0, ge=0, lt=1)
    """Assumed share of flipped labels for `robust` (in [0, 0.5)); EXO's epsilon for `exo_pair` (> 0)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference's logprobs of every pair once before training instead of keeping the reference
    model in memory while training (the final evaluation still loads it, to measure KL)."""
    min_accuracy: float = checked(0.6, ge=0, le=1)
    """Fail the stage when the implicit reward prefers the chosen response on fewer held-out pairs than this."""

    def __post_init__(self) -> None:
        if self.loss_type == "exo_pair" and not 0 < self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: {self.label_smoothing}; loss_type exo_pair needs it in (0, 1) "
                             "(the EXO paper uses 1e-3)")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: {self.label_smoothing}; loss_type robust needs it in [0, 0.5)")


class DPOStage(LearnsFromPairs, TrainerStage, PolicyStage):
    """Direct preference optimisation with `trl.DPOTrainer`; the reference is the policy input."""

    name = "dpo"
    config_class = DPOConfig
    inputs = {"policy": "sft", "preferences": "preferences"}
    training_panels = (("loss", "DPO loss"), ("rewards/margins", "implicit reward margin"),
                       ("rewards/accuracies", "pair accuracy (training batches)"))

    # -- override points --------------------------------------------------------------------------

    def build_model(self):
        """The policy to train and its tokenizer (pad token added and embeddings resized if it had none)."""
        return load_causal_lm(self.input_path("policy"))

    def build_dataset(self):
        """(train, {source: eval}) preference datasets in conversational form (TRL renders them through the
        chat template, loss on the response tokens)."""
        return self.pair_datasets(self.read_pairs())

    def prepare(self) -> None:
        c = self.config
        # With LoRA the reference is the policy with its adapters off; precomputed logprobs need none in memory.
        self.reference = None if c.lora.enabled or c.precompute_ref_log_probs else self.build_reference()
        self.train_ds, self.eval_sets = self.build_dataset()
        self.start_evaluation()

    def build_trainer(self):
        """The `trl.DPOTrainer` (checkpoints under the work directory; TRL's LM head per `fused_lm_head`)."""
        from trl import DPOConfig as TRLDPOConfig
        from trl import DPOTrainer

        c = self.config
        args = trainer_arguments(
            TRLDPOConfig, self,
            lr_scheduler_type=c.lr_scheduler_type,
            max_length=c.max_length,
            beta=c.beta,
            loss_type=[c.loss_type],
            label_smoothing=c.label_smoothing,
            precompute_ref_log_probs=c.precompute_ref_log_probs,
        )
        trainer = DPOTrainer(
            model=self.model,
            ref_model=None if c.precompute_ref_log_probs else self.reference,  # None with LoRA: adapters off
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_sets or None,
            processing_class=self.tokenizer,
            peft_config=c.lora.peft_config() if c.lora.enabled else None,
            callbacks=[trainer_callback(self.tracker), self.evaluation_callback()],
        )
        if not fused_lm_head_wanted(c.fused_lm_head):  # what TRL's DPO loss and logs read from its head
            weighting = ("log_sum_sq_probs",) if trainer.use_weighting else ()
            use_plain_lm_head(trainer, ("log_probs", "entropy", "mean_logits", "is_top1", *weighting))
        return trainer

    def describe(self) -> str:
        c = self.config
        return f", {len(self.trainer.train_dataset)} training pairs, loss {c.loss_type}, beta {c.beta:g}"

    @torch.no_grad()
    def pair_metrics(self, reference) -> dict:
        """Held-out preference accuracy and mean implicit-reward margin per source, over every pair of the
        eval sets as the trainer tokenized them (`accuracy`: all sources together)."""
        c, metrics, correct, total = self.config, {}, 0, 0
        model = self.model.eval()
        for source, ds in (self.trainer.eval_dataset or {}).items():
            chosen, rejected = [], []
            for start in range(0, len(ds), c.batch_size):
                rows = [ds[i] for i in range(start, min(start + c.batch_size, len(ds)))]
                batch = {k: v.to(model.device) for k, v in self.trainer.data_collator(rows).items()}
                inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                if "ref_chosen_logps" in batch:  # precomputed by the trainer
                    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
                else:
                    ref = sequence_logprobs(reference, *inputs)
                r_chosen, r_rejected = implicit_rewards(sequence_logprobs(model, *inputs), ref, c.beta).chunk(2)
                chosen.append(r_chosen)
                rejected.append(r_rejected)
            stats = pair_statistics(torch.cat(chosen), torch.cat(rejected))
            metrics.update({f"accuracy_{source}": stats["accuracy"], f"margin_{source}": stats["margin"],
                            f"eval_pairs_{source}": len(ds)})
            correct, total = correct + stats["accuracy"] * len(ds), total + len(ds)
        metrics["accuracy"] = correct / total if total else float("nan")
        return metrics

    # -- lifecycle --------------------------------------------------------------------------------

    def train(self) -> dict:
        # The reference policy's evaluation: the model is still the policy input here (a resumed run loads
        # its checkpoint inside trainer.train), so a rerun measures the same baseline.
        self.measure_reference(lambda: self.evaluation.run(self.model, self.tokenizer))
        return {**super().train(), "train_pairs": len(self.trainer.train_dataset)}

    def evaluate(self) -> dict:
        c, key = self.config, f"stages.{self.stage_name}"
        # after LoRA's merge or with precomputed logprobs there is no reference in memory: load it for KL
        reference = self.reference if self.reference is not None else self.build_reference().to(self.model.device)
        pairs = self.pair_metrics(reference)
        metrics = self.compare_with_reference(self.evaluation.run(self.model, self.tokenizer, reference=reference),
                                              self.trainer.state.global_step, **pairs)
        held_out = sum(v for k, v in metrics.items() if k.startswith("eval_pairs_"))
        if held_out and metrics["accuracy"] < c.min_accuracy:
            raise StageError(
                f"{self.stage_name}: the policy's implicit reward prefers the chosen response on only "
                f"{metrics['accuracy']:.0%} of {held_out} held-out pairs (floor {key}.min_accuracy={c.min_accuracy}). "
                f"Train longer or at a higher {key}.learning_rate, check the pairs (the preferences stage's margin "
                "and judge), or lower the floor on purpose."
            )
        return metrics

    def require_eos(self, metrics, fix=""):
        key = f"stages.{self.stage_name}"
        super().require_eos(metrics, fix or f"A policy that stops ending its answers has drifted too far: raise "
                            f"{key}.beta, lower {key}.learning_rate or train fewer steps, or lower the floor on purpose.")

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        return f"{super().headline(m)}, held-out pair accuracy {fmt(m, 'accuracy', '{:.2f}')}"

    @classmethod
    def report_notes(cls, m):
        sources = [k.removeprefix("accuracy_") for k in m if k.startswith("accuracy_")]
        return [f"- held-out {s} pairs: the implicit reward prefers the chosen response on {m[f'accuracy_{s}']:.3f} "
                f"of {m.get(f'eval_pairs_{s}', '?')}, mean margin {m.get(f'margin_{s}', float('nan')):.3f}"
                for s in sources]
