"""KTO: align the policy on answers marked desirable or undesirable, one at a time (Ethayarajh et al. 2024).

In:  the `sft` policy, also the reference, and preference pairs as DPO reads them (a preferences stage's
     dataset, preference files or hub datasets). Each pair becomes two unpaired examples, the chosen answer
     desirable and the rejected one undesirable (`trl.data_utils.unpair_preference_dataset`), shuffled.
Out: a policy artifact evaluated and reported like every policy stage (rlhf/policy.py), with the held-out
     examples' KTO loss per source.

Training is `trl.KTOTrainer`: the loss holds each answer's log-ratio beta * log(pi / pi_ref) against the
batch's estimate of KL(pi || pi_ref), from the batch's answers paired with other prompts (so a batch needs
at least two examples). This file is the whole method: the policy stage's lifecycle (reference
evaluation, comparison, samples, EOS floor, report) and the Trainer's (resume, LoRA merge, save, verify)
come from its base classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.schema import checked
from rlhf.models import load_causal_lm
from rlhf.policy import PolicyStage
from rlhf.preferences import LearnsFromPairs, PairPolicySettings
from rlhf.tracking import trainer_callback
from rlhf.trainers import TrainerStage, fused_lm_head_wanted, trainer_arguments, use_plain_lm_head


@dataclass
class KTOConfig(PairPolicySettings):
    """The KTO stage's settings: its loss's, beside those of every pair-learning policy stage
    (`PairPolicySettings`: policy, pairs to unpair, schedule, LoRA, EOS floor) and the Trainer's."""

    beta: float = checked(0.1, gt=0)
    """Strength of the pull towards the reference (higher: closer)."""
    desirable_weight: float = checked(1.0, gt=0)
    """Weight of the desirable answers' loss (raise it where desirable answers are fewer)."""
    undesirable_weight: float = checked(1.0, gt=0)
    """Weight of the undesirable answers' loss."""
    batch_size: int = checked(16, ge=2, hint="KTO estimates its KL term from the other answers of the batch")
    """Unpaired examples per device per forward pass (a pair gives two)."""


class KTOStage(LearnsFromPairs, TrainerStage, PolicyStage):
    """Kahneman-Tversky optimisation with `trl.KTOTrainer` on the pairs' answers, unpaired."""

    name = "kto"
    config_class = KTOConfig
    inputs = {"policy": "sft", "preferences": "preferences"}
    training_panels = (("loss", "KTO loss"), ("kl", "KL estimate (batch)"), ("rewards/margins", "reward margin"))

    def build_model(self):
        """The policy to train and its tokenizer."""
        return load_causal_lm(self.input_path("policy"))

    def build_dataset(self):
        """(train, {source: held-out}) unpaired examples {"prompt", "completion", "label"} in chat form."""
        from trl.data_utils import unpair_preference_dataset

        train, evals = self.pair_datasets(self.read_pairs())
        # unpairing puts every chosen answer before every rejected one; the trainer reads in order
        return (unpair_preference_dataset(train).shuffle(seed=self.seed),
                {source: unpair_preference_dataset(ds) for source, ds in evals.items()})

    def prepare(self) -> None:
        """The reference (none with LoRA: the policy with its adapters off), the data, the evaluation."""
        self.reference = None if self.config.lora.enabled else self.build_reference()
        self.train_ds, self.eval_sets = self.build_dataset()
        self.start_evaluation()

    def build_trainer(self):
        """The `trl.KTOTrainer` (checkpoints under the work directory; TRL's LM head per `fused_lm_head`), with
        the periodic evaluation."""
        from trl import KTOConfig as TRLKTOConfig
        from trl import KTOTrainer

        c = self.config
        args = trainer_arguments(TRLKTOConfig, self, beta=c.beta, desirable_weight=c.desirable_weight,
                                 undesirable_weight=c.undesirable_weight, max_length=c.max_length,
                                 lr_scheduler_type=c.lr_scheduler_type,
                                 train_sampling_strategy="sequential")  # the KL pairs are drawn in order
        trainer = KTOTrainer(model=self.model, ref_model=self.reference, args=args, train_dataset=self.train_ds,
                             eval_dataset=self.eval_sets or None, processing_class=self.tokenizer,
                             peft_config=c.lora.peft_config() if c.lora.enabled else None,
                             callbacks=[trainer_callback(self.tracker), self.evaluation_callback()])
        if not fused_lm_head_wanted(c.fused_lm_head):  # what TRL's KTO loss and logs read from its head
            use_plain_lm_head(trainer, ("log_probs", "entropy", "mean_logits"))
        return trainer

    def train(self) -> dict:
        """The starting policy's evaluation (kept in the store), then the Trainer's run."""
        self.measure_reference(lambda: self.evaluation.run(self.model, self.tokenizer))  # before training moves it
        return {**super().train(), "train_examples": len(self.trainer.train_dataset)}

    def evaluate(self) -> dict:
        """The held-out examples' KTO loss, and the shared evaluation against the starting policy."""
        held_out = {f"loss_{source}": self.trainer.evaluate(source, metric_key_prefix="eval")["eval_loss"]
                    for source in self.eval_sets}  # the held-out examples' KTO loss, by source
        reference = self.reference if self.reference is not None else self.build_reference().to(self.model.device)
        final = self.evaluation.run(self.model, self.tokenizer, reference=reference)
        return self.compare_with_reference(final, self.trainer.state.global_step, **held_out)

    @classmethod
    def report_notes(cls, m):
        return [f"- held-out {k.removeprefix('loss_')} examples: KTO loss {m[k]:.3f}" for k in m if k.startswith("loss_")]
