"""Reward model: learn which of two responses the annotators prefer.

In:  the `sft` artifact (or a hub id / local directory) to start from, and preferences from two sources,
     mixable in YAML: a preference file or hub dataset, and on-policy pairs (the stage samples K
     responses per prompt from the policy and a judge ranks them: the InstructGPT loop with simulated
     annotators).
Out: a reward-model artifact (AutoModelForSequenceClassification, one label, score read at the last real
     token), with held-out pairwise accuracy per source, the mean margin, and the reward mean/std over
     policy samples that PPO normalises scores with. Below `min_accuracy` the stage fails instead of
     handing a useless reward model to PPO.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field

import torch

from rlhf.config import checked, logging_only
from rlhf.data import load_rows
from rlhf.models import (LoraSettings, count_parameters, disable_dropout, load_causal_lm, verify_checkpoint,
                         whole_models)
from rlhf.sampling import batches, chat_prompt, sample
from rlhf.stage import Stage, StageError
from rlhf.tokenizer import load_tokenizer, tokenizer_facts
from rlhf.tracking import trainer_callback
from rlhf.trainers import finished_weights, train_from_last_checkpoint, trainer_arguments

log = logging.getLogger("rlhf")


@dataclass
class OnPolicyConfig:
    """On-policy preference collection: sample K responses per prompt, let a judge pick best and worst."""

    enabled: bool = True
    """Collect on-policy pairs."""
    prompts: str = "data/prompts/train.jsonl.gz"
    """Prompts to sample responses for ({"prompt"} rows)."""
    num_prompts: int = checked(1024, ge=1)
    """How many prompts to use."""
    k: int = checked(4, ge=2, hint="ranking needs at least 2 responses per prompt")
    """Responses sampled per prompt."""
    judge: str = "word_vader"
    """The simulated annotator: a built-in judge name or a dotted path to `fn(prompts, responses, **columns)
    -> scores` (columns: the prompt rows' other fields)."""
    margin: float = checked(0.1, ge=0)
    """Drop pairs whose judge scores differ by less than this."""
    label_noise: float = checked(0.0, ge=0, le=1)
    """Probability of swapping chosen and rejected (annotator noise experiments)."""
    eval_fraction: float = checked(0.1, ge=0, lt=1)
    """Share of prompts whose pairs are held out for evaluation."""
    max_new_tokens: int = checked(48, ge=1)
    """Response length limit when sampling."""
    temperature: float = checked(1.0, gt=0)
    """Sampling temperature."""


@dataclass
class RewardConfig:
    model: str = "sft"
    """Model the reward model starts from: an upstream stage name, a hub id or a local HF directory."""
    policy: str | None = None
    """Policy that on-policy responses are sampled from; None = the same as `model`."""
    train_data: str | None = "data/preferences/train.jsonl.gz"
    """Preference pairs ({"prompt","chosen","rejected"}); None to train on on-policy pairs only."""
    eval_data: str | None = "data/preferences/valid.jsonl.gz"
    """Held-out preference pairs."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy pairs ranked by a judge."""
    max_length: int = checked(128, ge=2)
    """Pairs with a side longer than this many tokens are dropped."""
    max_steps: int = checked(400, ge=1)
    """Optimizer steps."""
    batch_size: int = checked(32, ge=1)
    """Pairs per device per forward pass."""
    gradient_accumulation_steps: int = checked(1, ge=1)
    """Forward passes per optimizer step."""
    learning_rate: float = checked(5e-4, gt=0)
    """Peak learning rate."""
    warmup_steps: int = checked(20, ge=0)
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = checked(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = checked(1.0, ge=0)
    """Gradient clipping norm (0: no clipping)."""
    center_rewards_coefficient: float | None = checked(0.01, ge=0)
    """Penalty on (r_chosen + r_rejected)^2 that keeps scores centred near 0 (None: off)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Train LoRA adapters instead of all weights (merged into the artifact)."""
    bf16: bool = False
    """bf16 mixed precision (GPUs that support it)."""
    min_accuracy: float = checked(0.7, ge=0, le=1)
    """Promotion gate: fail when held-out pairwise accuracy is below this."""
    stats_samples: int = checked(256, ge=2)
    """Policy samples scored to get the reward mean and std PPO normalises with."""
    logging_steps: int = logging_only(10, ge=1)
    """Log training loss every N steps."""
    save_steps: int = logging_only(100, ge=1)
    """Write a resumable checkpoint every N steps."""


class RewardStage(Stage):
    """Reward modelling with `trl.RewardTrainer` on human and on-policy preference pairs."""

    name = "reward"
    config_class = RewardConfig
    kind = "reward-model"
    inputs = {"model": "sft", "policy": "sft"}
    # on-policy prompts are read even without on-policy pairs: the reward statistics are taken on them
    data_schemas = {"train_data": "preferences", "eval_data": "preferences", "onpolicy.prompts": "prompts"}

    def data_files(self):
        c = self.config
        files = {"train": c.train_data, "eval": c.eval_data}
        # read even without on-policy pairs: the reward statistics are taken over samples on these prompts
        files["onpolicy_prompts"] = c.onpolicy.prompts
        return files

    def check(self) -> None:
        """The base checks, preferences from somewhere, and the on-policy judge on two of its prompts."""
        super().check()
        self.require_preferences()
        c = self.config.onpolicy
        if c.enabled:
            self.check_judge(c.judge, "onpolicy.judge", c.prompts)

    def require_preferences(self) -> None:
        if self.config.train_data is None and not self.config.onpolicy.enabled:
            raise StageError(f"{self.where('train_data')}: no preferences: set stages.{self.stage_name}.train_data "
                             f"or enable stages.{self.stage_name}.onpolicy")

    def validate_inputs(self) -> None:
        super().validate_inputs()
        self.require_preferences()
        if "policy" in self.input_refs:
            self.require_same_tokenizer("model", "policy")

    # -- override points --------------------------------------------------------------------------

    def collect_onpolicy(self) -> tuple[list[dict], list[dict], list[str]]:
        """Sample K responses per prompt from the policy and let the judge rank them.

        Returns (train pairs, held-out pairs, all sampled responses). Pairs are split by prompt so
        held-out prompts were never seen in training. Under several processes the main one samples
        and judges, and every rank trains on its pairs.
        """
        from rlhf.distributed import broadcast_object, is_main_process

        pairs = self._collect_onpolicy() if is_main_process() else None
        return broadcast_object(pairs)

    def _collect_onpolicy(self) -> tuple[list[dict], list[dict], list[str]]:
        import json

        from rlhf.judges import load_judge, rank_pairs

        c = self.config.onpolicy
        cached = self.work_dir / "onpolicy.json"
        if cached.exists():  # a resumed run must train on the same pairs
            saved = json.loads(cached.read_text())
            return saved["train"], saved["eval"], saved["responses"]
        judge = load_judge(c.judge, field="stages.reward.onpolicy.judge")
        rows = load_rows(c.prompts, "prompts", limit=c.num_prompts)
        prompts = rows["prompt"]
        columns = {name: rows[name] for name in rows.column_names if name != "prompt"}  # e.g. the task's answers
        policy_path = self.input_path("policy" if "policy" in self.input_refs else "model")
        repeated = [p for p in prompts for _ in range(c.k)]
        with whole_models():  # the main process alone samples
            policy, tok = load_causal_lm(policy_path)
            samples = sample(policy, tok, repeated, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                             batch_size=64, progress=True)
        grouped = [[s.response for s in samples[i * c.k : (i + 1) * c.k]] for i in range(len(prompts))]
        pairs = rank_pairs(prompts, grouped, judge, margin=c.margin, noise=c.label_noise, seed=self.seed,
                           columns=columns)
        held = set(random.Random(self.seed).sample(list(prompts), int(len(prompts) * c.eval_fraction)))
        train = [p for p in pairs if p["prompt"] not in held]
        evals = [p for p in pairs if p["prompt"] in held]
        responses = [s.response for s in samples]
        tmp = cached.with_suffix(".tmp")  # renamed into place: a kill mid-write leaves no half cache
        tmp.write_text(json.dumps({"train": train, "eval": evals, "responses": responses}))
        tmp.replace(cached)
        log.info("reward: %d on-policy pairs from %d prompts x %d samples (%d held out)",
                 len(pairs), len(prompts), c.k, len(evals))
        return train, evals, responses

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
        """(train, {source: eval}) preference datasets in conversational form."""
        import datasets

        c = self.config
        train_rows, evals = [], {}
        if c.train_data:
            train_rows += load_rows(c.train_data, "preferences").to_list()
        if c.eval_data:
            evals["human"] = [_conversational(r) for r in load_rows(c.eval_data, "preferences").to_list()]
        if c.onpolicy.enabled:
            on_train, on_eval, self.policy_responses = self.collect_onpolicy()
            train_rows += on_train
            if on_eval:
                evals["onpolicy"] = [_conversational(r) for r in on_eval]
        if not train_rows:
            raise StageError("reward: no training pairs (the judge kept none; lower stages.reward.onpolicy.margin)")
        train = datasets.Dataset.from_list([_conversational(r) for r in train_rows]).shuffle(seed=self.seed)
        return train, {k: datasets.Dataset.from_list(v) for k, v in evals.items()}

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

    def setup(self) -> None:
        from rlhf.distributed import refuse_sharded_lora

        refuse_sharded_lora("reward", self.config.lora.enabled)  # before training, not after it
        self.policy_responses: list[str] = []
        self.model, self.tokenizer = self.build_model()
        self.train_ds, self.eval_sets = self.build_dataset()
        self.trainer = self.build_trainer()
        self.model = self.trainer.model
        log.info("reward: %d trainable of %d parameters, %d training pairs", count_parameters(self.model, True),
                 count_parameters(self.model), len(self.train_ds))

    def train(self) -> dict[str, float]:
        metrics = train_from_last_checkpoint(self)
        # Every rank gathers sharded weights (ZeRO-3, FSDP); LoRA is merged into the model.
        self.full_state, self.model = finished_weights(self)
        return {**metrics, "train_pairs": len(self.train_ds)}

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
        responses = self.policy_responses[: c.stats_samples] or self._sample_policy(c.stats_samples)
        prompts = self._stats_prompts(len(responses))
        scores = self.score(prompts, responses)
        metrics["reward_mean"], metrics["reward_std"] = scores.mean().item(), scores.std().item()
        self.tracker.log({k: v for k, v in metrics.items()}, step=self.trainer.state.global_step)
        log.info("reward: held-out accuracy %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                           if k.startswith("accuracy")))
        if total and metrics["accuracy"] < c.min_accuracy:
            raise StageError(
                f"reward: held-out accuracy {metrics['accuracy']:.3f} is below stages.reward.min_accuracy="
                f"{c.min_accuracy}; a reward model this weak would steer PPO at random. Train longer, add pairs, "
                "or lower the gate on purpose."
            )
        return metrics

    def _stats_prompts(self, n: int) -> list[str]:
        c = self.config.onpolicy
        prompts = load_rows(c.prompts, "prompts", limit=c.num_prompts)["prompt"]
        return [p for p in prompts for _ in range(c.k)][:n] if c.enabled else prompts[:n]

    def _sample_policy(self, n: int) -> list[str]:
        c = self.config.onpolicy
        policy, tok = load_causal_lm(self.input_path("policy" if "policy" in self.input_refs else "model"))
        prompts = load_rows(c.prompts, "prompts", limit=n)["prompt"]
        return [s.response for s in sample(policy, tok, prompts, max_new_tokens=c.max_new_tokens,
                                           temperature=c.temperature)]

    def save(self, out) -> None:
        self.model.save_pretrained(str(out), state_dict=getattr(self, "full_state", None))
        self.tokenizer.save_pretrained(str(out))
        if self.config.lora.enabled:
            shutil.copytree(self.work_dir / "adapter", out / "adapter")

    def verify_saved(self, out) -> None:
        from transformers import AutoModelForSequenceClassification

        verify_checkpoint(self.model, out, AutoModelForSequenceClassification, self.tokenizer,
                          getattr(self, "full_state", None))

    def manifest_extra(self):
        return tokenizer_facts(self.tokenizer)

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


def _conversational(row: dict) -> dict:
    """A {"prompt","chosen","rejected"} row as chat turns, so TRL renders it through the chat template."""
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
