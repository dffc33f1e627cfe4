"""What the stages that run their own RL loop share: their inputs and checks, their setup, and their end.

`RLStage` is to an RL loop what `TrainerStage` (rlhf/trainers.py) is to a Trainer: it builds what the
loop works with and publishes what it made, so a stage keeps only its algorithm (stages/ppo.py: the
rollout, score, rewards, advantages and update; stages/grpo.py and stages/dapo.py: their defaults and one
step each). It reads the settings every RL stage's config has alike (`policy`, `rewards`, `prompts`, the
batch sizes, `lora`, the rollout engine's; stages/ppo_config.py is one such config) and knows no stage.

    setup     the launch (`RLLaunch`: processes, seeds), the models (policy, reference, value, reward models:
              `build_models`), the optimizer, the KL controller, the rewards, the rollout engine and the
              `Sampler` that may run it ahead, the training prompts and the evaluation's (too long ones dropped)
    ending    the policy judged by the experiment's evaluation against the reference, saved (LoRA merged,
              its adapter kept), reloaded and checked

Each `build_*` is a method a subclass may replace.
"""

from __future__ import annotations

import logging

from rlhf.engines import Sampler, SamplingSettings, engine_class, require_installed
from rlhf.errors import StageError
from rlhf.launch import PhaseTimer, RLLaunch, StepCounter
from rlhf.models import count_parameters, save_policy, verify_checkpoint
from rlhf.policy import PolicyStage
from rlhf.ppo import AdaptiveKLController, FixedKLController
from rlhf.ppo.estimators import ESTIMATORS
from rlhf.prompts import Prompts, step_rows, within_length
from rlhf.rewards import Rewards, is_function, model_sources
from rlhf.rollout import load_rl_models
from rlhf.tokenizer import tokenizer_facts

log = logging.getLogger("rlhf")


class RLStage(PolicyStage):
    """A policy stage with its own RL loop: set up from its config, judged, saved and checked at the end."""

    inputs = {"policy": "sft"}
    data_schemas = {"prompts": "prompts"}

    @classmethod
    def input_values(cls, config) -> dict[str, str | None]:
        """The policy, every reward model of `rewards` (as `rewards.<name>`) and an explicit value model."""
        values = {"policy": config.policy, **{f"rewards.{name}": name for name in model_sources(config.rewards)}}
        if ESTIMATORS[config.estimator].needs_values and config.value_model is not None:
            values["value_model"] = config.value_model
        return values

    def data_files(self):
        return {"prompts": self.config.prompts}

    def check(self) -> None:
        """Also before anything trains: every reward function loads and scores two rows of the prompts with
        one finite real number each (`check_judge`; the loaded function is called as the stage calls it,
        with the columns it takes, and its scores checked by the same `checked_scores`)."""
        super().check()
        for name in self.config.rewards:
            if is_function(name):
                self.check_judge(name, "rewards", self.config.prompts)
        require_installed(self.config.rollout_engine, self.where("rollout_engine"))

    def validate_inputs(self) -> None:
        super().validate_inputs()
        self.require_same_tokenizer(*self.input_refs)

    @property
    def estimator(self):
        return ESTIMATORS[self.config.estimator]

    # ---- setup ---------------------------------------------------------------------------------

    def build_models(self):
        """(policy, reference or None, value model or None, {reward model source: model}, tokenizer)
        (rlhf.rollout.load_rl_models). No reference without a KL term (or with LoRA: the adapters-off policy
        is the reference); a value model only where the estimator needs one, starting from `value_model`, the
        first reward model (its head then starts as the reward head) or the policy with a fresh head."""
        c = self.config
        rewards = {name: self.input_path(f"rewards.{name}") for name in model_sources(c.rewards)}
        value = None
        if self.estimator.needs_values:
            value = self.input_path("value_model" if "value_model" in self.input_refs else
                                    f"rewards.{next(iter(rewards))}" if rewards else "policy")
        return load_rl_models(self.input_path("policy"), rewards, value, lora=c.lora, reference=c.uses_reference,
                              packed=c.pack_sequences)

    def build_optimizer(self):
        """AdamW over policy and value parameters, each with its own learning rate."""
        c = self.config
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": c.learning_rate}]
        if self.value_model is not None:
            groups.append({"params": [p for p in self.value_model.parameters() if p.requires_grad],
                           "lr": c.value_learning_rate})
        return self.launch.adamw(groups)

    def build_kl_controller(self):
        c = self.config
        if c.adaptive_kl:
            return AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
        return FixedKLController(c.kl_coef)

    def build_rewards(self, models: dict) -> Rewards:
        """The weighted reward sources: reward models with their manifest's normalisation, functions checked
        at every call (rlhf.rewards.Rewards.build)."""
        c = self.config
        return Rewards.build(c.rewards, models, lambda name: (self.input_manifest(f"rewards.{name}") or {}).get(
            "metrics", {}), normalize=c.normalize_score, field=f"stages.{self.stage_name}.rewards")

    def build_engine(self):
        """The rollout engine (`rollout_engine`, rlhf/engines.py) sampling with this stage's settings: hf on
        the policy itself, or on a copy where rollouts run ahead (`max_staleness`); vllm from the policy's
        checkpoint, its weights replaced after every update."""
        c, options = self.config, dict(self.config.engine_options or {})
        # FSDP's ranks run the same forwards, and may hold different numbers of distinct prompts
        fsdp = bool(self.launch.generate_extra().get("synced_gpus"))
        if c.shared_prefill_required and fsdp:
            raise StageError(f"{self.stage_name}: shared_prefill: true under FSDP, where every rank must run the "
                             "same forwards and ranks may hold different numbers of distinct prompts; set "
                             f"stages.{self.stage_name}.shared_prefill: false (or leave it unset) or launch with "
                             "DeepSpeed or DDP")
        settings = SamplingSettings(c.max_new_tokens, c.temperature, c.top_p, bf16=c.bf16_sampling, sampler=c.sampler,
                                    logprobs=c.sampler_logprobs, shared_prefill=c.shared_prefill and not fsdp)
        if self.launch.num_processes > 1 and (c.rollout_engine != "hf" or c.max_staleness):
            raise StageError(f"{self.stage_name}: rollout_engine: {c.rollout_engine} and max_staleness > 0 are "
                             "tested in one process only; launch without several processes")
        if c.rollout_engine == "hf":
            return engine_class("hf")(self.tokenizer, self.launch, settings, copy=c.max_staleness > 0, **options)
        return engine_class(c.rollout_engine)(self.tokenizer, self.launch, settings, model=self.input_path("policy"),
                                              seed=self.seed, **options)

    def setup(self) -> None:
        c = self.config
        self.launch = RLLaunch.start(self.stage_name, micro_batch_size=c.micro_batch_size, seed=self.seed,
                                     gradient_accumulation_steps=c.gradient_accumulation_steps,
                                     max_grad_norm=c.max_grad_norm, lora=c.lora.enabled)
        self.accelerator = self.launch.accelerator
        self.launch.check_split(self.stage_name, c.rollout_batch_size, c.num_minibatches, c.samples_per_prompt)
        policy, reference, value, reward_models, self.tokenizer = self.build_models()
        self.policy, self.value_model = policy, value
        self.optimizer = self.build_optimizer()
        self.policy, self.reference, self.value_model, frozen, self.optimizer = self.launch.prepare(
            policy, reference, value, list(reward_models.values()), self.optimizer)
        self.rewards = self.build_rewards(dict(zip(reward_models, frozen)))
        self.kl_ctl = self.build_kl_controller()
        self.progress = StepCounter()
        self.timer = PhaseTimer()
        self.accelerator.register_for_checkpointing(self.kl_ctl, self.progress)
        self.rollout_engine = self.build_engine()
        self.sampler = Sampler(self.rollout, self.rollout_engine, c.max_staleness)
        rows = Prompts.load(c.prompts)
        keep = set(self.drop_long_prompts(rows.texts, f"stages.{self.stage_name}.prompts ({c.prompts})"))
        rows = rows.select([i for i, p in enumerate(rows.texts) if p in keep])
        self.prompts, self.prompt_columns = rows.texts, rows.columns  # the kept rows and their other columns
        self.start_evaluation()
        kept = set(self.drop_long_prompts(self.evaluation.prompts,
                                          f"evaluation.prompts ({self.experiment.evaluation.prompts})"))
        self.evaluation.keep_prompts(kept.__contains__)
        log.info("%s: policy %d trainable parameters, %s; %d prompts, %d steps of %d responses (%d per prompt)",
                 self.stage_name, count_parameters(self.policy, True),
                 f"value {count_parameters(self.value_model, True)}" if self.value_model is not None else "no value model",
                 len(self.prompts), c.num_steps, c.rollout_batch_size, c.samples_per_prompt)

    def drop_long_prompts(self, prompts: list[str], field: str) -> list[str]:
        """`prompts` without those longer than `max_prompt_tokens` (all of them when it is None)."""
        return within_length(self.tokenizer, prompts, self.config.max_prompt_tokens, field,
                             f"stages.{self.stage_name}.max_prompt_tokens")

    def prompts_for_step(self, step: int) -> list[int]:
        """Indices into `self.prompts` of `step`'s rollout: rollout_batch_size / K prompts, each repeated
        K = samples_per_prompt times in a row (a group), in a seeded shuffle per pass (rlhf.prompts.step_rows)."""
        c = self.config
        return step_rows(step, c.rollout_batch_size, c.samples_per_prompt, len(self.prompts), self.seed)

    def rollout(self, prompts: list[str]):
        """Step 1: sample responses with the rollout engine. Returns an `rlhf.engines.Rollout`."""
        return self.rollout_engine.sample(prompts)

    def rank_rows(self, step: int) -> list[int]:
        """This rank's rows of `step`'s rollout (`prompts_for_step`, then `RLLaunch.local_rows`)."""
        return self.launch.local_rows(self.prompts_for_step(step))

    def save_checkpoint(self, path) -> None:
        """The accelerator's state (models, optimizer, RNG, KL controller, step) and the rollouts sampled
        ahead, so a resumed run neither loses them nor samples them again."""
        self.accelerator.save_state(str(path))
        self.sampler.save(path)

    # ---- evaluation and saving -----------------------------------------------------------------

    def judge_policy(self, greedy: bool | None) -> dict:
        """The experiment's evaluation of the current policy (per-prompt lists; KL to the reference where
        the stage holds one). `greedy` None: as the evaluation config says; False: sampled responses only."""
        with self.launch.generation_model() as policy:
            return self.evaluation.run(policy, self.tokenizer, greedy=greedy, **self.reference_kwargs(policy))

    def evaluate(self) -> dict:
        return self.compare_with_reference(self.judge_policy(greedy=None), self.progress.step)

    def save(self, out) -> None:
        policy = self.accelerator.unwrap_model(self.policy)
        if self.config.lora.enabled:
            policy.save_pretrained(str(out / "adapter"))
            policy = policy.merge_and_unload()
            self.policy = policy
        # Sharded runs (ZeRO-3, FSDP) save the state every rank gathered at the end of training.
        save_policy(policy, self.tokenizer, out, getattr(self, "final_state", None))

    def verify_saved(self, out) -> None:
        from transformers import AutoModelForCausalLM

        verify_checkpoint(self.accelerator.unwrap_model(self.policy), out, AutoModelForCausalLM, self.tokenizer,
                          getattr(self, "final_state", None))

    def manifest_extra(self):
        return tokenizer_facts(self.tokenizer)

    @classmethod
    def report_notes(cls, m):
        return [f"**Stopped early:** {m['stopped_early']}."] if m.get("stopped_early") else []

    def memory_plan(self):
        """This stage's models, batch sizes and lengths, for `rlhf plan --memory` (PPOConfig.memory_plan)."""
        return self.config.memory_plan()
