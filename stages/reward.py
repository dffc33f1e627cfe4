"""Reward model: learn which of two responses the annotators prefer.

In:  the `sft` artifact (or a hub id / local directory) to start from, and preference pairs: a
     preferences stage's dataset (on-policy pairs a judge ranked, with any human pairs it passed through;
     stages/preferences.py) and preference files or hub datasets, mixable in YAML.
Out: a reward-model artifact (AutoModelForSequenceClassification, one label, score read at the last real
     token), with held-out pairwise accuracy per source, the mean margin, and the reward mean/std over
     policy samples that PPO normalises scores with. Below `min_accuracy` the stage fails instead of
     handing a useless reward model to PPO.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from rlhf.schema import checked
from rlhf.data import load_rows
from rlhf.errors import StageError
from rlhf.models import LoraSettings, disable_dropout, load_causal_lm, whole_models
from rlhf.preferences import LearnsFromPairs
from rlhf.sampling import batches, chat_prompt, sample
from rlhf.tokenizer import load_tokenizer
from rlhf.tracking import trainer_callback
from rlhf.trainers import TrainerSettings, TrainerStage, trainer_arguments

log = logging.getLogger("rlhf")


@dataclass
class RewardConfig(TrainerSettings):
    """The reward stage's settings; the Trainer's (`max_steps`, `batch_size`, ...) come from
    `TrainerSettings`, with the reward model's own learning rate redeclared here."""

    model: str = "sft"
    """Model the reward model starts from: an upstream stage name, a hub id or a local HF directory."""
    policy: str | None = None
    """Policy whose samples give the reward mean/std when the preferences carry none; None = `model`."""
    preferences: str | None = None
    """Pairs from a preferences stage, or a directory of its files (train.jsonl, eval.jsonl); None for none."""
    train_data: str | None = None
    """Preference pairs from a file or hub dataset ({"prompt","chosen","rejected"}, source "human"), trained
    on beside those of `preferences`; None for none."""
    eval_data: str | None = None
    """Held-out preference pairs from a file or hub dataset (source "human")."""
    stats_prompts: str | None = None
    """Prompts the policy answers for the reward mean/std; None: the policy samples `preferences` carries
    (a preferences stage that sampled), which is the only way without this."""
    stats_max_new_tokens: int = checked(48, ge=1)
    """Response length limit of those answers."""
    max_length: int = checked(128, ge=2)
    """Pairs with a side longer than this many tokens are dropped."""
    learning_rate: float = checked(5e-4, gt=0)
    """Peak learning rate."""
    center_rewards_coefficient: float | None = checked(0.01, ge=0)
    """Penalty on (r_chosen + r_rejected)^2 that keeps scores centred near 0 (None: off)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Train LoRA adapters instead of all weights (merged into the artifact)."""
    min_accuracy: float = checked(0.7, ge=0, le=1)
    """Promotion gate: fail when held-out pairwise accuracy is below this."""
    stats_samples: int = checked(256, ge=2)
    """Policy samples scored to get the reward mean and std PPO normalises with (answers to the first
    `stats_prompts`, else the first of the preferences' samples)."""


class RewardStage(LearnsFromPairs, TrainerStage):
    """Reward modelling with `trl.RewardTrainer` on preference pairs (on-policy and human)."""

    name = "reward"
    config_class = RewardConfig
    kind = "reward-model"
    auto_class = "AutoModelForSequenceClassification"
    inputs = {"model": "sft", "policy": "sft", "preferences": "preferences"}
    data_schemas = {"train_data": "preferences", "eval_data": "preferences", "stats_prompts": "prompts"}

    def data_files(self):
        return {**super().data_files(), "stats_prompts": self.config.stats_prompts}

    def validate_inputs(self) -> None:
        super().validate_inputs()
        if "policy" in self.input_refs:
            self.require_same_tokenizer("model", "policy")

    # -- override points --------------------------------------------------------------------------

    def build_model(self):
        """A sequence-classification model with one label on top of the input model; dropout off."""
        from transformers import AutoModelForSequenceClassification

        path = self.input_path("model")
        tok = load_tokenizer(path)
        with whole_models():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            if len(tok) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id  # the score is read at the last non-pad token
        disable_dropout(model)
        return model, tok

    def build_dataset(self):
        """(train, {source: eval}) preference datasets in conversational form; keeps the policy samples
        the preferences carry for the reward statistics."""
        c = self.config
        data = self.read_pairs()
        self.policy_samples = data.sampled_responses()
        if c.stats_prompts is None and not self.policy_samples:
            raise StageError(f"{self.stage_name}: no policy samples for the reward mean/std PPO normalises with: the "
                             f"preferences carry none; set stages.{self.stage_name}.stats_prompts to a prompts file")
        return self.pair_datasets(data, shuffle=True)

    def build_trainer(self):
        """The `trl.RewardTrainer` (checkpoints under the work directory)."""
        from trl import RewardConfig as TRLRewardConfig
        from trl import RewardTrainer

        c = self.config
        args = trainer_arguments(TRLRewardConfig, self, lr_scheduler_type="cosine", max_length=c.max_length,
                                 center_rewards_coefficient=c.center_rewards_coefficient)
        return RewardTrainer(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            processing_class=self.tokenizer,
            peft_config=c.lora.peft_config("SEQ_CLS") if c.lora.enabled else None,
            callbacks=[trainer_callback(self.tracker)],
        )

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
        """Reward-model scores of responses to prompts, formatted exactly as PPO will feed them."""
        tok, model = self.tokenizer, self.model
        model.eval()
        texts = [chat_prompt(tok, p) + r + tok.eos_token for p, r in zip(prompts, responses)]
        out = []
        with torch.no_grad():
            for chunk in batches(texts, batch_size):
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                out.append(model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)

    # -- lifecycle --------------------------------------------------------------------------------

    def describe(self) -> str:
        return f", {len(self.train_ds)} training pairs"

    def train(self) -> dict[str, float]:
        return {**super().train(), "train_pairs": len(self.train_ds)}

    def evaluate(self) -> dict:
        c = self.config
        metrics: dict = {}
        correct = total = 0
        for source, ds in self.eval_sets.items():
            prompts = [r[0]["content"] for r in ds["prompt"]]
            chosen = self.score(prompts, [r[0]["content"] for r in ds["chosen"]])
            rejected = self.score(prompts, [r[0]["content"] for r in ds["rejected"]])
            wins = (chosen > rejected).sum().item()
            metrics[f"accuracy_{source}"] = wins / len(ds)
            metrics[f"margin_{source}"] = (chosen - rejected).mean().item()
            metrics[f"eval_pairs_{source}"] = len(ds)
            correct, total = correct + wins, total + len(ds)
        metrics["accuracy"] = correct / total if total else float("nan")
        # Reward statistics over policy samples: PPO can normalise scores with them.
        samples = self._sample_policy(c.stats_samples) if c.stats_prompts else self.policy_samples[: c.stats_samples]
        prompts, responses = zip(*samples)
        scores = self.score(list(prompts), list(responses))
        metrics["reward_mean"], metrics["reward_std"] = scores.mean().item(), scores.std().item()
        self.tracker.log({k: v for k, v in metrics.items()}, step=self.trainer.state.global_step)
        accuracies = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("accuracy"))
        log.info("%s: held-out accuracy %s", self.stage_name, accuracies)
        if total and metrics["accuracy"] < c.min_accuracy:
            raise StageError(
                f"{self.stage_name}: held-out accuracy {metrics['accuracy']:.3f} is below "
                f"stages.{self.stage_name}.min_accuracy={c.min_accuracy}; a reward model this weak would steer PPO "
                "at random. Train longer, add pairs, or lower the gate on purpose."
            )
        return metrics

    def _sample_policy(self, n: int) -> list[tuple[str, str]]:
        """(prompt, response) for the first `n` of `stats_prompts`, answered by the policy."""
        c = self.config
        policy, tok = load_causal_lm(self.input_path("policy" if "policy" in self.input_refs else "model"))
        prompts = load_rows(c.stats_prompts, "prompts", limit=n)["prompt"]
        return [(s.prompt, s.response) for s in sample(policy, tok, prompts, max_new_tokens=c.stats_max_new_tokens)]

    @classmethod
    def headline(cls, m):
        parts = [f"{k.removeprefix('accuracy_')} {m[k]:.3f}" for k in m if k.startswith("accuracy_")]
        return "accuracy " + ", ".join(parts)

    @classmethod
    def report_section(cls, section):
        from rlhf.report import bar_plot

        m = section.metrics
        sources = [k.removeprefix("accuracy_") for k in m if k.startswith("accuracy_")]
        if not sources:
            return []
        bar_plot(section.out_dir / "reward_accuracy.png", sources, [m[f"accuracy_{s}"] for s in sources],
                 "held-out pairwise accuracy", "Reward model agreement with the judge")
        section.plots.append("reward_accuracy.png")
        return ["![reward accuracy](reward_accuracy.png)", "",
                *(f"- {s}: accuracy {m[f'accuracy_{s}']:.3f} on {m.get(f'eval_pairs_{s}', '?')} pairs, "
                  f"mean margin {m.get(f'margin_{s}', float('nan')):.3f}" for s in sources)]
