"""PPO: optimise the SFT policy against the reward model, held near the SFT model by a KL penalty.

In:  the `sft` policy and the `reward` model (or hub ids / local directories), and prompts.
Out: a policy artifact, with the experiment's shared evaluation of the SFT policy and of the PPO policy on
     the same held-out prompts: gold, held-out and task judges, diversity, KL and length, sampled and greedy,
     with paired-bootstrap intervals of each gain.

Our own loop on Accelerate (TRL no longer ships PPO), after Ziegler et al. 2019, Ouyang et al. 2022 and
Huang et al. 2024. The loop is `train()`; every step is a small method a subclass can replace.
What running under `accelerate launch` needs (sharding, gathering, reductions) is in
`rlhf/ppo/launch.py`; with one process it stays out of the way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from rlhf.checkpoints import CheckpointDir, write_atomic
from rlhf.config import checked, logging_only
from rlhf.data import load_rows
from rlhf.evaluation import PolicyEvaluation, compare, summarize
from rlhf.models import (LoraSettings, count_parameters, disable_dropout, load_causal_lm, verify_checkpoint,
                         whole_models)
from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    apply_no_eos_penalty,
    compute_rewards,
    explained_variance,
    gae,
    has_eos,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_sum,
    policy_loss,
    response_mask_from_eos,
    value_loss,
    with_state_after_eos,
)
from rlhf.ppo.launch import LaunchMixin, PhaseTimer, StepCounter
from rlhf.ppo.packing import use_packed_attention
from rlhf.ppo.rollout import Trajectory, policy_forward, score_at_eos, trim_padding, value_forward
from rlhf.sampling import chat_prompt, encode_prompts, generate, generation_config
from rlhf.stage import Stage, StageError
from rlhf.tokenizer import tokenizer_facts

log = logging.getLogger("rlhf")

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


@dataclass
class PPOConfig:
    policy: str = "sft"
    """Policy to optimise (and the reference): an upstream stage, a hub id or a local directory."""
    reward_model: str = "reward"
    """Reward model (the value model starts from it): an upstream stage, a hub id or a local directory."""
    prompts: str = "data/prompts/train.jsonl.gz"
    """Training prompts ({"prompt"} rows; the held-out ones are the experiment's `evaluation.prompts`)."""
    num_steps: int = checked(120, ge=1)
    """PPO iterations (each: one rollout batch, then `ppo_epochs` passes over it)."""
    rollout_batch_size: int = checked(64, ge=1)
    """Prompts per rollout."""
    num_minibatches: int = checked(4, ge=1)
    """Minibatches per PPO epoch (one optimizer step each)."""
    gradient_accumulation_steps: int = checked(1, ge=1)
    """Micro-batches per minibatch; the update equals the full-minibatch one."""
    ppo_epochs: int = checked(4, ge=1)
    """Passes over each rollout batch."""
    max_new_tokens: int = checked(32, ge=1)
    """Response length limit."""
    max_prompt_tokens: int | None = checked(None, ge=1)
    """Drop training and held-out prompts longer than this many tokens, chat template included (long
    dialogues would crowd out the response within the context and swell every batch); None keeps all."""
    temperature: float = checked(1.0, gt=0, hint="PPO samples its rollouts; a value below 1 (e.g. 0.7) makes "
                                                  "them less random")
    """Sampling temperature; logprobs are computed at the same temperature."""
    top_p: float = checked(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0 = off, which keeps sampling logprobs exact)."""
    pack_sequences: bool = True
    """Run the scoring and training forwards on packed sequences (a batch's real tokens in one row,
    attention kept within each sequence): no compute on padding, the same numbers to float rounding.
    Needs attention through transformers' attention interface (Llama, GPT-NeoX, GPT-2 are tested); the
    stage stops with an error otherwise. False: padded batches."""
    no_eos_score: float | None = checked(-1.0, finite=True)
    """Score given to responses without EOS instead of the reward model's (None: keep the model's)."""
    normalize_score: bool = True
    """Standardise scores with the reward mean/std of the reward model's manifest."""
    kl_estimator: str = checked("k1", choices=tuple(KL_ESTIMATORS))
    """Per-token KL estimator in the reward: k1 (log-ratio) or k3 ((r-1) - log r)."""
    kl_coef: float = checked(0.05, ge=0)
    """KL penalty coefficient (initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt the coefficient towards `kl_target` (Ziegler et al.)."""
    kl_target: float = checked(6.0, gt=0)
    """Target per-sequence KL for the adaptive controller (nats)."""
    kl_horizon: int = checked(10000, ge=1)
    """Horizon of the adaptive controller (episodes)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch (scale only)."""
    score_after_eos: bool = True
    """Place the score one position after EOS, on the state after the last action: its value is the
    value model at the EOS token (where the reward head it started from reads), GAE bootstraps through
    it and the value model learns it, as in TRL's PPO. False makes the score the EOS token's reward and
    ends the episode there. Over 47 and 62 seeds the two reached the same reward within the noise (True
    +0.026, 95% interval -0.007 to +0.059: bench/RESULTS.md, "Reward over many seeds")."""
    gamma: float = checked(1.0, ge=0, le=1)
    """Discount."""
    lam: float = checked(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch."""
    learning_rate: float = checked(3e-4, gt=0)
    """Policy learning rate."""
    value_learning_rate: float = checked(3e-4, gt=0)
    """Value-model learning rate."""
    clip_range: float = checked(0.2, gt=0)
    """PPO ratio clip."""
    clip_range_value: float = checked(0.2, gt=0)
    """Value clip around the rollout's values."""
    vf_coef: float = checked(0.5, ge=0)
    """Weight of the value loss."""
    max_grad_norm: float = checked(1.0, gt=0)
    """Gradient clipping norm (policy and value together)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA on the policy; the reference is then the same weights with adapters disabled."""
    kl_budget: float = checked(15.0, gt=0)
    """Watchdog: stop when the rollout's mean per-sequence KL exceeds this (nats), keeping the last good policy."""
    min_response_length: float = checked(2.0, ge=0)
    """Watchdog: stop when the mean response length falls below this many tokens."""
    min_unique_share: float | None = checked(0.25, ge=0, le=1)
    """Watchdog: stop when fewer than this share of a rollout's responses (one per prompt) are distinct:
    the policy is collapsing onto a few answers whatever the prompt asks (None: off)."""
    eval_every: int = logging_only(20, ge=0)
    """Run the experiment's evaluation (sampled responses only) every N steps, for the curves of the report
    (0: only at the end)."""
    save_every: int = logging_only(10, ge=0)
    """Write a resumable checkpoint every N steps (0: never)."""

    def __post_init__(self) -> None:
        if self.lora.enabled and self.lora.dropout:
            # the rollout samples and scores in eval mode, the update runs in train mode where adapter dropout is on
            raise ValueError(f"lora.dropout: {self.lora.dropout} must be 0 in PPO: the update would train a policy "
                             "with adapter dropout on, which is not the policy that sampled the rollout; set it to 0")
        per_epoch = self.num_minibatches * self.gradient_accumulation_steps
        if self.rollout_batch_size % per_epoch:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must divide evenly into num_minibatches "
                f"({self.num_minibatches}) x gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )

    @property
    def minibatch_size(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps


class PPOStage(LaunchMixin, Stage):
    """PPO with a separate value model, a frozen reference, per-token KL in the reward and GAE."""

    name = "ppo"
    config_class = PPOConfig
    kind = "policy"
    inputs = {"policy": "sft", "reward_model": "reward"}
    data_schemas = {"prompts": "prompts"}

    def data_files(self):
        return {"prompts": self.config.prompts}

    def validate_inputs(self) -> None:
        super().validate_inputs()
        self.require_same_tokenizer("policy", "reward_model")

    # ---- setup ---------------------------------------------------------------------------------

    def build_models(self):
        """(policy, reference or None, value model, reward model, tokenizer), dropout off everywhere."""
        from transformers import AutoModelForSequenceClassification

        policy, tok = load_causal_lm(self.input_path("policy"))
        rm_path = self.input_path("reward_model")
        with whole_models():  # DeepSpeed partitions at prepare (rlhf.models.whole_models)
            reward = AutoModelForSequenceClassification.from_pretrained(rm_path).requires_grad_(False).eval()
            value = AutoModelForSequenceClassification.from_pretrained(rm_path)  # value head starts as the reward head
        if self.config.pack_sequences:
            for m in (policy, reward, value):
                use_packed_attention(m)
        if self.config.lora.enabled:
            from peft import get_peft_model

            policy, reference = get_peft_model(policy, self.config.lora.peft_config()), None
        else:
            reference = copy.deepcopy(policy).requires_grad_(False).eval()
        for m in (reward, value):
            disable_dropout(m)
        return policy, reference, value, reward, tok

    def build_optimizer(self):
        """AdamW over policy and value parameters, each with its own learning rate."""
        c = self.config
        groups = [
            {"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": c.learning_rate},
            {"params": [p for p in self.value_model.parameters() if p.requires_grad], "lr": c.value_learning_rate},
        ]
        # The fused kernel is the same AdamW, with one pass over all tensors per step instead of a Python
        # loop over them: about 5% of a small model's PPO step on CPU (bench/RESULTS.md).
        state = self.accelerator.state
        fused = (self.accelerator.device.type in ("cpu", "cuda") and getattr(state, "deepspeed_plugin", None) is None
                 and getattr(state, "fsdp_plugin", None) is None)
        return torch.optim.AdamW(groups, eps=1e-5, fused=fused or None)

    def build_kl_controller(self):
        c = self.config
        if c.adaptive_kl:
            return AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
        return FixedKLController(c.kl_coef)

    def setup(self) -> None:
        from rlhf.distributed import new_accelerator, refuse_sharded_lora, uses_deepspeed

        c = self.config
        refuse_sharded_lora("ppo", c.lora.enabled)
        # DeepSpeed steps inside backward, so it must know the micro-batches per optimizer step.
        # (new_accelerator forms a CPU launch's gloo group first and drops an earlier stage's Trainer settings)
        self.accelerator = (new_accelerator(gradient_accumulation_steps=c.gradient_accumulation_steps)
                            if uses_deepspeed() else new_accelerator())
        self.check_process_split(self.accelerator.num_processes)
        if self.accelerator.process_index:
            # Every rank was seeded alike; without its own stream each would sample the same random numbers.
            torch.manual_seed(self.seed + 100003 * self.accelerator.process_index)
        policy, reference, value, reward, self.tokenizer = self.build_models()
        self.policy, self.value_model = policy, value
        self.optimizer = self.build_optimizer()
        self.prepare_models(policy, reference, value, reward)
        self.kl_ctl = self.build_kl_controller()
        self.progress = StepCounter()
        self.timer = PhaseTimer()
        self.accelerator.register_for_checkpointing(self.kl_ctl, self.progress)
        self.prompts = self.drop_long_prompts(load_rows(c.prompts, "prompts")["prompt"], f"stages.ppo.prompts ({c.prompts})")
        self.evaluation = PolicyEvaluation(self.experiment.evaluation, self.seed)
        kept = set(self.drop_long_prompts(self.evaluation.prompts,
                                          f"evaluation.prompts ({self.experiment.evaluation.prompts})"))
        self.evaluation.keep_prompts(kept.__contains__)
        rm_manifest = self.input_manifest("reward_model") or {}
        stats = rm_manifest.get("metrics", {})
        self.score_mean = stats.get("reward_mean", 0.0) if c.normalize_score else 0.0
        self.score_std = stats.get("reward_std", 1.0) if c.normalize_score else 1.0
        log.info("ppo: policy %d trainable parameters, value %d; %d prompts, %d steps of %d",
                 count_parameters(self.policy, True), count_parameters(self.value_model, True),
                 len(self.prompts), c.num_steps, c.rollout_batch_size)

    def drop_long_prompts(self, prompts: list[str], field: str) -> list[str]:
        """`prompts` without those longer than `max_prompt_tokens` (all of them when it is None)."""
        limit = self.config.max_prompt_tokens
        if limit is None:
            return prompts
        tok = self.tokenizer
        lengths = [len(ids) for ids in tok([chat_prompt(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]]
        kept = [p for p, n in zip(prompts, lengths) if n <= limit]
        if not kept:
            raise StageError(f"ppo: every prompt of {field} is longer than stages.ppo.max_prompt_tokens={limit} "
                             f"tokens (shortest {min(lengths)}); raise the limit")
        if len(kept) < len(prompts):
            log.info("ppo: %d of %d %s longer than max_prompt_tokens=%d dropped", len(prompts) - len(kept),
                     len(prompts), field, limit)
        return kept

    # ---- override points: one per step of the loop ---------------------------------------------

    def prompts_for_step(self, step: int) -> list[str]:
        """The prompt batch of `step`: a seeded shuffle per pass over the prompts, so resuming is exact."""
        b, n = self.config.rollout_batch_size, len(self.prompts)
        out = []
        for i in range(step * b, (step + 1) * b):
            epoch, pos = divmod(i, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            out.append(self.prompts[order[pos].item()])
        return out

    @torch.no_grad()
    def rollout(self, prompts: list[str]):
        """Step 1: sample responses. Returns (query_ids, query_mask, response_ids, response_mask)."""
        c, tok = self.config, self.tokenizer
        enc = encode_prompts(tok, prompts, self.accelerator.device)
        with self.generation_model() as policy:
            policy.eval()
            # the stage's settings alone: the checkpoint's generation_config must not reshape what is sampled
            config = generation_config(tok, max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p)
            seqs = generate(policy, config, **enc, **self.generate_extra())
        query_ids, query_mask = enc["input_ids"], enc["attention_mask"].bool()
        response_ids = seqs[:, query_ids.shape[1] :]
        response_mask = response_mask_from_eos(response_ids, tok.eos_token_id)
        # generate pads finished rows with pad ids; make that explicit for rows that never ended too
        response_ids = torch.where(response_mask, response_ids, tok.pad_token_id)
        return query_ids, query_mask, response_ids, response_mask

    @torch.no_grad()
    def score(self, query_ids, query_mask, response_ids, response_mask):
        """Step 2: reward-model score at EOS; fixed score without EOS; normalised. Returns (scores, raw)."""
        c = self.config
        raw = score_at_eos(self.reward_model, query_ids, query_mask, response_ids, response_mask,
                           packed=c.pack_sequences)
        scores = (raw - self.score_mean) / self.score_std
        if c.no_eos_score is not None:
            scores = apply_no_eos_penalty(scores, has_eos(response_ids, self.tokenizer.eos_token_id), c.no_eos_score)
        return scores, raw

    def reference_context(self):
        """Where the reference is the LoRA base, its forward runs with adapters disabled."""
        if self.reference is None:
            return self.accelerator.unwrap_model(self.policy).disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def reference_logprobs(self, query_ids, query_mask, response_ids, response_mask):
        model = self.reference if self.reference is not None else self.policy
        with self.reference_context():
            return policy_forward(model, query_ids, query_mask, response_ids, response_mask, self.config.temperature,
                                  packed=self.config.pack_sequences)[0]

    def episode_mask(self, response_mask: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """(B, R) positions with a value and a return: the response tokens, and the state after EOS
        when `score_after_eos`. The policy loss and advantage whitening stay on the response tokens."""
        return with_state_after_eos(response_mask, eos) if self.config.score_after_eos else response_mask

    def compute_rewards(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: per-token rewards (B, R) = -beta * KL + score at the episode's end. Returns (rewards, kl)."""
        kl = KL_ESTIMATORS[self.config.kl_estimator](traj.logprobs, traj.ref_logprobs)
        episode = self.episode_mask(traj.response_mask, traj.has_eos)
        rewards = compute_rewards(traj.scores, kl, self.kl_ctl.value, traj.response_mask, episode)
        if self.config.whiten_rewards:
            rewards = self.whiten(rewards, episode, shift_mean=False)
        return rewards, kl

    def compute_advantages(self, rewards: torch.Tensor, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: GAE advantages (whitened) and returns, both (B, R)."""
        episode = self.episode_mask(traj.response_mask, traj.has_eos)
        advantages, returns = gae(rewards, traj.values, episode, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            advantages = self.whiten(advantages, traj.response_mask)
        return advantages, returns

    def loss(self, mb: Trajectory, advantages, returns) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Step 5 (per micro-batch): (clipped policy loss, clipped value loss, statistics).

        Each loss is a mean over its own positions: the policy's over the response tokens, the value's
        over `episode_mask`. `update` weighs them by `vf_coef` and by the micro-batch's share of those
        positions in the minibatch, which makes gradient accumulation exact.
        """
        c = self.config
        logprobs, entropy = policy_forward(self.policy, mb.query_ids, mb.query_mask, mb.response_ids,
                                           mb.response_mask, c.temperature, with_entropy=True, entropy_grad=False,
                                           packed=c.pack_sequences)
        episode = self.episode_mask(mb.response_mask, mb.has_eos)
        values = value_forward(self.value_model, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                               packed=c.pack_sequences, value_mask=episode)
        pg, pg_stats = policy_loss(logprobs, mb.logprobs, advantages, mb.response_mask, c.clip_range)
        vf, vf_stats = value_loss(values, mb.values, returns, episode, c.clip_range_value)
        stats = {
            "policy/loss": pg.detach(), "policy/clipfrac": pg_stats["clipfrac"],
            "policy/approx_kl": pg_stats["approx_kl"], "policy/ratio": pg_stats["ratio_mean"],
            "policy/entropy": masked_mean(entropy.detach(), mb.response_mask),
            "value/loss": vf.detach(), "value/clipfrac": vf_stats["clipfrac"],
        }
        return pg, vf, stats

    # ---- the loop ------------------------------------------------------------------------------

    def make_trajectory(self, prompts: list[str]) -> Trajectory:
        """Steps 1-2 and the forwards that go with them: one rollout batch with everything PPO needs."""
        timed, packed = self.timer, self.config.pack_sequences
        with timed("rollout"):
            q_ids, q_mask, r_ids, r_mask = self.rollout(prompts)
        with torch.no_grad():
            with timed("policy_forward"):
                logprobs = policy_forward(self.policy, q_ids, q_mask, r_ids, r_mask, self.config.temperature,
                                          packed=packed)[0]
            with timed("reference_forward"):
                ref_logprobs = self.reference_logprobs(q_ids, q_mask, r_ids, r_mask)
            eos = has_eos(r_ids, self.tokenizer.eos_token_id)
            with timed("value_forward"):
                values = value_forward(self.value_model, q_ids, q_mask, r_ids, r_mask, packed=packed,
                                       value_mask=self.episode_mask(r_mask, eos))
        with timed("score"):
            scores, raw = self.score(q_ids, q_mask, r_ids, r_mask)
        return Trajectory(q_ids, q_mask, r_ids, r_mask, logprobs, ref_logprobs, values, scores, raw, eos)

    def update(self, traj: Trajectory, advantages, returns) -> dict[str, float]:
        """Step 5: `ppo_epochs` passes of minibatch updates over one rollout batch."""
        c, acc = self.config, self.accelerator
        n = acc.num_processes
        self.policy.train()
        self.value_model.train()
        episode = self.episode_mask(traj.response_mask, traj.has_eos)
        totals: dict[str, float] = {}
        count = 0
        for _ in range(c.ppo_epochs):
            # With N processes each rank holds B/N rows; a minibatch takes minibatch_size/N from each.
            order = torch.randperm(c.rollout_batch_size // n, device=traj.query_ids.device)
            for mb_idx in order.split(c.minibatch_size // n):
                # Token-weighted accumulation: each micro-batch's masked means are scaled by its share of the
                # minibatch's positions, so the summed gradient equals the full-minibatch masked means'.
                policy_tokens = self.minibatch_tokens(traj.response_mask[mb_idx])
                value_tokens = self.minibatch_tokens(episode[mb_idx])
                micro_batches = mb_idx.split(c.micro_batch_size // n)
                for i, micro_idx in enumerate(micro_batches):
                    # columns that are padding in every row of this micro-batch cost compute and change nothing
                    mb, mb_adv, mb_ret = trim_padding(Trajectory(*(t[micro_idx] for t in traj)), advantages[micro_idx],
                                                      returns[micro_idx], response_columns=episode[micro_idx])
                    pg, vf, stats = self.micro_batch_loss(mb, mb_adv, mb_ret)
                    loss = (pg * (mb.response_mask.sum() / policy_tokens)
                            + c.vf_coef * vf * (episode[micro_idx].sum() / value_tokens))
                    self.backward(loss, last_micro_batch=i == len(micro_batches) - 1)
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + float(v)
                    count += 1
                acc.clip_grad_norm_(list(self.policy.parameters()) + list(self.value_model.parameters()),
                                    c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return {k: v / count for k, v in totals.items()}

    def train(self) -> dict:
        c, acc = self.config, self.accelerator
        # Each checkpoint is written aside and renamed into place whole: a run killed mid-save resumes
        # from the previous checkpoint, never from a mixture of two steps (rlhf/checkpoints.py).
        checkpoints = CheckpointDir(self.work_dir / "checkpoints", is_main_process=acc.is_main_process,
                                    barrier=acc.wait_for_everyone)
        # Step 0 numbers of the SFT policy are measured once and kept beside the checkpoints, so a
        # resumed run compares against the same baseline.
        baseline_file = self.work_dir / "baseline.json"
        if (latest := checkpoints.latest()) is not None:
            acc.load_state(str(latest))
            log.info("ppo: resuming at step %d", self.progress.step)
        if baseline_file.exists():
            self.baseline = json.loads(baseline_file.read_text())
        else:
            self.baseline = self.judge_policy(greedy=None)
            if acc.is_main_process:
                write_atomic(baseline_file, json.dumps(self.baseline))
        resumed_from = self.progress.step
        self.stopped: str | None = None
        last_good, good_step = None, self.progress.step
        from tqdm.auto import tqdm

        bar = tqdm(range(self.progress.step, c.num_steps), desc="ppo", initial=self.progress.step, total=c.num_steps,
                   disable=not self.accelerator.is_main_process)  # one bar for a launch, not one per rank
        for step in bar:
            step_start = time.perf_counter()
            # 1-2. rollout and score
            traj = self.make_trajectory(self.local_prompts(step))
            # 3. rewards: per-token KL penalty plus the score at the episode's end (on the state after EOS)
            rewards, kl = self.compute_rewards(traj)
            # 4. advantages
            advantages, returns = self.compute_advantages(rewards, traj)
            # 6a. watchdogs look at the rollout of the policy the last update produced
            # (over every rank's rows: all ranks must take the same decision)
            seq_kl = self.batch_mean(masked_sum(kl, traj.response_mask, dim=1))
            length = self.batch_mean(traj.response_mask.sum(1).float())
            unique = self.batch_unique_share(traj.response_ids, traj.response_mask)
            reason = self.watchdog(seq_kl, length, unique)
            if reason:
                self.stopped = f"step {step}: {reason}"
                if last_good is None:  # the first rollout of this run: nothing earlier is in memory
                    log.warning("ppo: stopping: %s; keeping the policy this run started from", self.stopped)
                else:
                    log.warning("ppo: stopping: %s; keeping the policy of step %d", self.stopped, good_step)
                    self.restore_policy(last_good)
                break
            # This rollout passed, so its policy is the last good one (a CPU copy: cheap for the
            # models this runs on CPU, and the only way to go back one step without a checkpoint per step).
            state = self.gathered_policy_state()
            if state is None:  # not sharded: every rank holds the whole policy
                state = self.accelerator.unwrap_model(self.policy).state_dict()
            last_good = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            good_step = step
            # 5. update
            with self.timer("update"):
                stats = self.update(traj, advantages, returns)
            self.kl_ctl.update(seq_kl, c.rollout_batch_size)
            # 6. log
            episode = self.episode_mask(traj.response_mask, traj.has_eos)
            stats.update({
                "env/score": traj.scores.mean().item(), "env/raw_score": traj.raw_scores.mean().item(),
                "env/reward_total": masked_sum(rewards, episode, dim=1).mean().item(), "env/kl": seq_kl,
                "env/kl_coef": self.kl_ctl.value, "env/response_length": length,
                "env/eos_rate": traj.has_eos.float().mean().item(), "env/unique_share": unique,
                "value/explained_variance": explained_variance(traj.values, returns, episode).item(),
                **self.timer.pop(), "time/step": time.perf_counter() - step_start,
            })
            self.progress.step = step + 1
            if c.eval_every and self.progress.step % c.eval_every == 0:
                results = self.judge_policy(greedy=False)
                stats.update({f"eval/{k}": v for k, v in summarize(results, self.evaluation.roles).items()})
            stats = self.reduce_stats(stats)
            self.tracker.log(stats, step=self.progress.step)
            bar.set_postfix(score=f"{stats['env/score']:.2f}", kl=f"{seq_kl:.2f}")
            if c.save_every and self.progress.step % c.save_every == 0:
                checkpoints.save(self.progress.step, lambda path: acc.save_state(str(path)))
        self.final_state = self.gathered_policy_state()  # every rank gathers; the main one saves
        return {"train_steps": self.progress.step, "resumed_from_step": resumed_from,
                "stopped_early": self.stopped, "kl_coef_final": self.kl_ctl.value}

    def watchdog(self, seq_kl: float, length: float, unique_share: float) -> str | None:
        """A reason to stop, or None. KL past the budget, collapsing responses or the same few answers to
        every prompt mean the policy is gaming the reward model."""
        c = self.config
        if not math.isfinite(seq_kl) or seq_kl > c.kl_budget:
            return f"KL to the reference {seq_kl:.2f} exceeds stages.ppo.kl_budget={c.kl_budget}"
        if length < c.min_response_length:
            return f"mean response length {length:.1f} fell below stages.ppo.min_response_length={c.min_response_length}"
        if c.min_unique_share is not None and unique_share < c.min_unique_share:
            return (f"only {unique_share:.0%} of the rollout's responses are distinct, below "
                    f"stages.ppo.min_unique_share={c.min_unique_share}")
        return None

    # ---- evaluation and saving -----------------------------------------------------------------

    def judge_policy(self, greedy: bool | None) -> dict:
        """The experiment's evaluation of the current policy (per-prompt lists; KL to the reference).
        `greedy` None: as the evaluation config says; False: sampled responses only (the curves)."""
        with self.generation_model() as policy:
            return self.evaluation.run(policy, self.tokenizer, reference=self.reference,
                                       reference_context=self.reference_context, greedy=greedy)

    def evaluate(self) -> dict:
        final = self.judge_policy(greedy=None)
        metrics = {"eval_prompts": len(self.evaluation.prompts),
                   **compare(self.baseline, final, self.evaluation.roles, self.seed),
                   "samples": self.evaluation.samples(final, before=self.baseline)}
        log.info("ppo: %s", self.headline(metrics))
        return metrics

    def save(self, out) -> None:
        policy = self.accelerator.unwrap_model(self.policy)
        if self.config.lora.enabled:
            policy.save_pretrained(str(out / "adapter"))
            policy = policy.merge_and_unload()
            self.policy = policy
        policy.generation_config.pad_token_id = self.tokenizer.pad_token_id
        policy.generation_config.eos_token_id = self.tokenizer.eos_token_id
        # Sharded runs (ZeRO-3, FSDP) save the state every rank gathered at the end of training.
        policy.save_pretrained(str(out), state_dict=getattr(self, "final_state", None))
        self.tokenizer.save_pretrained(str(out))

    def verify_saved(self, out) -> None:
        from transformers import AutoModelForCausalLM

        verify_checkpoint(self.accelerator.unwrap_model(self.policy), out, AutoModelForCausalLM, self.tokenizer,
                          getattr(self, "final_state", None))

    def manifest_extra(self):
        return tokenizer_facts(self.tokenizer)

    @classmethod
    def headline(cls, m):
        from rlhf.report import fmt

        return (f"gold {fmt(m, 'gold_ref')} -> {fmt(m, 'gold')}, task success {fmt(m, 'task_ref', '{:.2f}')} -> "
                f"{fmt(m, 'task', '{:.2f}')}, held-out {fmt(m, 'heldout_ref')} -> {fmt(m, 'heldout')}, unique "
                f"{fmt(m, 'unique_share_ref', '{:.2f}')} -> {fmt(m, 'unique_share', '{:.2f}')}, KL {fmt(m, 'kl')}")

    @classmethod
    def report_section(cls, section):
        from rlhf.report import comparison_table, overoptimisation_plot, samples_table

        m = section.metrics
        panels = [(label, [(label, *section.series(key))]) for key, label in (
            ("env/score", "score"), ("env/kl", "KL to reference"), ("env/response_length", "response length"),
            ("env/unique_share", "unique responses"))]
        lines = [section.plot(f"{section.name}_training.png", panels, f"{section.name} rollouts"), ""]
        if m.get("stopped_early"):
            lines += [f"**Stopped early:** {m['stopped_early']}.", ""]
        lines += [overoptimisation_plot(section, f"{section.name}_overoptimisation.png"), ""]
        lines += comparison_table(m, "reference", section.name)
        lines += samples_table(m.get("samples", []), [("greedy_before", "reference, greedy"),
                                                      ("greedy_after", f"{section.name}, greedy"),
                                                      ("before", "reference, sampled"),
                                                      ("after", f"{section.name}, sampled")])
        return lines
