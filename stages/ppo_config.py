"""The settings of the RL stages (`stages.ppo`, `stages.grpo`): one dataclass for the one loop.

Every field has a docstring and a declared range; `__post_init__` checks what spans fields (batch sizes
that divide, a group large enough for the estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlhf.engines import ENGINES
from rlhf.schema import checked, logging_only
from rlhf.models import LoraSettings
from rlhf.ppo import kl_k1, kl_k3
from rlhf.ppo.aggregation import AGGREGATIONS
from rlhf.ppo.losses import POLICY_LOSSES
from rlhf.ppo.estimators import ESTIMATORS
from rlhf.sampling import SAMPLERS

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
KL_PLACEMENTS = ("reward", "loss")
IMPORTANCE_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class PPOConfig:
    policy: str = "sft"
    """Policy to optimise (and the reference): an upstream stage, a hub id or a local directory."""
    rewards: dict[str, float] | None = None
    """Reward sources and their weights: reward models (an upstream stage, a hub id or a local directory)
    and functions (a built-in judge name or `package.module:function`, called as
    `fn(prompts, responses, **columns)`); the reward is the weighted sum (rlhf/rewards.py). None: the
    `reward` stage's model, {reward: 1.0} (a mapping given in YAML replaces this default, not merges with it)."""
    value_model: str | None = None
    """Where the value model starts (GAE only): None = the first reward model of `rewards` (its head then
    starts as the reward head), or the policy with a fresh head when every source is a function."""
    estimator: str = checked("gae", choices=tuple(ESTIMATORS))
    """Advantage estimator: gae (value model), grpo, grpo_batch_std (the batch's std instead of the group's:
    TRL's scale_rewards="batch"), dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline
    (rlhf/ppo/estimators.py). Only gae builds a value model."""
    samples_per_prompt: int = checked(1, ge=1)
    """Responses per prompt in a rollout (a group; GRPO, Dr. GRPO, RLOO and REINFORCE++-baseline use the
    group's other responses as the baseline, so they need 2 or more)."""
    loss_aggregation: str = checked("token_mean", choices=tuple(AGGREGATIONS))
    """How per-token losses make the minibatch loss: token_mean (over all the minibatch's tokens),
    sequence_mean (each sequence's token mean, averaged: GRPO's) or sequence_sum (each sequence's token
    sum over `max_new_tokens`, averaged: Dr. GRPO's); exact under accumulation and N processes."""
    prompts: str = "data/prompts/train.jsonl.gz"
    """Training prompts ({"prompt"} rows, with any other columns the reward functions read; the held-out
    ones are the experiment's `evaluation.prompts`)."""
    num_steps: int = checked(120, ge=1)
    """Iterations (each: one rollout batch, then `ppo_epochs` passes over it)."""
    rollout_batch_size: int = checked(64, ge=1)
    """Responses per rollout (rollout_batch_size / samples_per_prompt prompts)."""
    num_minibatches: int = checked(4, ge=1)
    """Minibatches per epoch (one optimizer step each)."""
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
    bf16_sampling: bool = checked(False, keyed_when_set=True)
    """Sample rollouts under bfloat16 autocast (faster on CPUs with AVX512-BF16 and on GPUs); the logprobs,
    values and update stay float32, so the samples come from a slightly different policy than the one the
    ratio is computed for (as with an inference engine; rlhf.sampling.generate)."""
    sampler: str = checked("inverse_cdf", choices=SAMPLERS, keyed_unless="multinomial")
    """How the hf engine draws each rollout token (rlhf.sampling.generate): inverse_cdf (greedy decoding over
    the warped scores with one uniform per row inverted through their cumulative softmax; the default since
    2026-12-07, `generate` of the tiny model 13% faster a token than gumbel on 2 CPU cores), gumbel (greedy
    decoding over the warped scores plus Gumbel noise, one uniform per vocabulary entry; the default from
    2026-12-06, 27% faster than multinomial) or multinomial (transformers' own `torch.multinomial`, the
    default before): the same distribution, other draws. Keyed unless multinomial, so artifacts sampled
    before either change keep their keys (set gumbel to reproduce a run of 2026-12-06 or 07)."""
    rollout_engine: str = checked("hf", choices=tuple(ENGINES), keyed_when_set=True)
    """Where rollouts are sampled (rlhf/engines.py): hf (`generate` in this process; on the training policy
    itself, or on a copy when `max_staleness` > 0) or vllm (vLLM's offline engine: `make vllm-setup`)."""
    engine_options: dict[str, Any] | None = checked(None, keyed_when_set=True)
    """Extra arguments of the rollout engine: for vllm those of `vllm.LLM` (e.g. {gpu_memory_utilization: 0.3,
    enforce_eager: false}); its dtype follows `bf16_sampling`."""
    max_staleness: int = checked(0, ge=0, le=8, keyed_when_set=True)
    """Sample the rollouts of the next steps while this one trains, against weights at most this many updates
    old (corrected by `importance_correction`); 0: the synchronous loop, each rollout from the current policy."""
    importance_correction: str = checked("token_truncate", choices=IMPORTANCE_CORRECTIONS, keyed_when_set=True)
    """Where the sampling engine's probabilities differ from the trainer's (an engine with weights of its own,
    a stale rollout), each token's loss is weighted by their ratio (rlhf/ppo/correction.py): per token or per
    sequence, truncated at `importance_upper` (TIS) or masked outside the bounds (MIS); none: no weights,
    the mismatch is still logged. Nothing to correct with hf at staleness 0."""
    importance_upper: float = checked(2.0, ge=1, keyed_when_set=True)
    """Upper bound of the importance ratio (veRL's default 2; TRL's 3)."""
    importance_lower: float | None = checked(None, gt=0, le=1, keyed_when_set=True)
    """Lower bound of the importance ratio (None: none, as TRL's default)."""
    reuse_rollout_forward: bool | None = checked(None, keyed_unless=False)
    """Train on the graph of the rollout's policy forward instead of running the same forward again, as TRL's
    GRPOTrainer does, where the update is one micro-batch holding the whole rollout batch (ppo_epochs 1,
    num_minibatches 1, gradient_accumulation_steps 1; one process, no DeepSpeed): 10-22% faster GRPO on
    SmolLM2-135M with LoRA. None (the default): wherever the config allows it, resolved when the config loads,
    and off for a launch of several processes or DeepSpeed; true: required (refused elsewhere); false: never.
    The same algorithm; the gradient's float rounding differs from the two-forward loop's (it sums the
    tokens in another order), so a run redraws as on another CPU. Keyed unless false, so runs made with two
    forwards keep their keys."""
    sampler_logprobs: bool | None = checked(None, keyed_unless=False)
    """Take the rollout's old log-probabilities (the PPO ratio's denominator, the KL's policy term) from the
    sampler, which computes each while drawing the token (rlhf.sampling.SampledLogprobs), instead of a
    forward pass over the rollout afterwards: the same distribution (the policy at the weights that sampled,
    softmax(logits / temperature)), one policy forward a step fewer (8% of a tiny-model GRPO step). Applies
    where the rollout is drawn by the training policy itself in float32: the hf engine, `max_staleness` 0,
    `bf16_sampling` false, and where `reuse_rollout_forward` does not keep that forward anyway. None (the
    default): wherever it applies, resolved when the config loads; true: required (refused elsewhere);
    false: never. The logits come from `generate`'s cached decoding rather than one pass over each
    sequence, so they differ by float rounding (~1e-6 on the tiny model) and a run redraws as on another
    CPU. Keyed unless false, so runs made with the forward keep their keys."""
    shared_prefill: bool | None = checked(None, keyed_unless=False)
    """The hf engine runs a prompt that several rollout rows share (a group of `samples_per_prompt`) through
    the model once before sampling, its cache copied to every row, instead of once per row
    (rlhf.sampling.prefill_shared_prompts): the same tokens drawn but for float rounding (the first token's
    logits to ~1e-5, which turned 3 of 640 rows of the tiny model to another token under inverse_cdf).
    Measured on 2 CPU cores: `generate` 6% faster for the tiny model's groups of 8 (19-token prompts), 17%
    for SmolLM2-135M's groups of 4 (69-token chat prompts); more for longer prompts and larger groups. vLLM shares prefixes itself (engine_options {enable_prefix_caching: true}). None (the default,
    since 2026-12-07): on wherever a group shares a prompt and the hf engine samples (resolved when the config
    loads), and left off under FSDP, whose ranks must run the same forwards; true: required (refused
    elsewhere); false: never. Keyed unless false, so runs made before it keep their keys."""
    pack_sequences: bool = True
    """Run the scoring and training forwards on packed sequences (a batch's real tokens in one row,
    attention kept within each sequence): no compute on padding, the same numbers to float rounding.
    Needs attention through transformers' attention interface (Llama, GPT-NeoX, GPT-2 are tested); the
    stage stops with an error otherwise. False: padded batches."""
    share_prompts: bool | None = checked(None, keyed_unless=False)
    """With `pack_sequences`, pack a prompt that several rows share (a group of `samples_per_prompt`
    responses) once: its tokens pass the layers once, every response attends to that one copy, and its
    gradient sums over them (rlhf.packing.pack). The same numbers to float rounding, fewer tokens in every
    forward of the loop (up to about half for the tiny model's GRPO groups of 8). None (the default): on where
    `samples_per_prompt` > 1 and `pack_sequences`; false: every row packs its own copy. Keyed unless false,
    so runs made before it keep their keys; like any change of float rounding, a run redraws."""
    no_eos_score: float | None = checked(-1.0, finite=True)
    """Score given to responses without EOS instead of the rewards' (None: keep the rewards')."""
    normalize_score: bool = True
    """Standardise each reward model's score with the reward mean/std of its manifest (functions are
    taken as they are)."""
    kl_penalty: str = checked("reward", choices=KL_PLACEMENTS)
    """Where the KL to the reference goes: `reward` (a per-token penalty -coef * KL in the reward, with
    `kl_estimator`) or `loss` (coef * the clamped k3 estimate added to the policy loss, as GRPO does)."""
    kl_estimator: str = checked("k1", choices=tuple(KL_ESTIMATORS))
    """Per-token KL estimator in the reward: k1 (log-ratio) or k3 ((r-1) - log r)."""
    kl_coef: float = checked(0.05, ge=0)
    """KL coefficient (initial value when adaptive: then > 0). 0 without `adaptive_kl` loads no reference model."""
    adaptive_kl: bool = False
    """Adapt the coefficient towards `kl_target` (Ziegler et al.)."""
    kl_target: float = checked(6.0, gt=0)
    """Target per-sequence KL for the adaptive controller (nats)."""
    kl_horizon: int = checked(10000, ge=1)
    """Horizon of the adaptive controller (episodes)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch (scale only; refused with reinforce_pp_baseline)."""
    score_after_eos: bool = True
    """Place the score one position after EOS, on the state after the last action: its value is the
    value model at the EOS token (where the reward head it started from reads), GAE bootstraps through
    it and the value model learns it, as in TRL's PPO. False makes the score the EOS token's reward and
    ends the episode there. Over 47 and 62 seeds the two reached the same reward within the noise (True
    +0.026, 95% interval -0.007 to +0.059: bench/RESULTS.md, "Reward over many seeds"). The critic-free
    estimators give the same advantages either way."""
    gamma: float = checked(1.0, ge=0, le=1)
    """Discount (GAE and REINFORCE++)."""
    lam: float = checked(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (after the estimator; REINFORCE++ always does). Refused with grpo,
    grpo_batch_std, dr_grpo and rloo, whose advantages it would distort."""
    learning_rate: float = checked(3e-4, gt=0)
    """Policy learning rate."""
    value_learning_rate: float = checked(3e-4, gt=0)
    """Value-model learning rate."""
    clip_range: float = checked(0.2, gt=0)
    """PPO ratio clip."""
    clip_range_high: float | None = checked(None, gt=0, keyed_when_set=True)
    """Upper clip of the ratio where it differs from `clip_range` (DAPO's clip-higher: 0.28 with 0.2); with
    policy_loss: cispo, the cap of its importance weight is 1 + clip_range_high (required)."""
    policy_loss: str = checked("ppo", choices=tuple(POLICY_LOSSES), keyed_when_set=True)
    """The policy loss (rlhf/ppo/losses.py): ppo (per-token clipped ratio), gspo (one ratio per sequence, the
    geometric mean of its tokens'; the paper clips at 3e-4 / 4e-4) or cispo (the clipped importance weight
    detached, every token keeps its gradient)."""
    clip_range_value: float = checked(0.2, gt=0)
    """Value clip around the rollout's values."""
    vf_coef: float = checked(0.5, ge=0)
    """Weight of the value loss."""
    max_grad_norm: float = checked(1.0, ge=0)
    """Gradient clipping norm (policy and value together); 0: no clipping, and no norm computed (TRL's PPO
    loop clips nothing)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA on the policy; the reference is then the same weights with adapters disabled."""
    kl_budget: float = checked(15.0, gt=0)
    """Watchdog: stop when the rollout's mean per-sequence KL exceeds this (nats), keeping the last good policy."""
    min_response_length: float = checked(2.0, ge=0)
    """Watchdog: stop when the mean response length falls below this many tokens."""
    min_unique_share: float | None = checked(0.25, ge=0, le=1)
    """Watchdog: stop when fewer than this share of a rollout's prompts get a response no other prompt
    got (one response per prompt): the policy is collapsing onto a few answers whatever the prompt
    asks (None: off)."""
    eval_every: int = logging_only(20, ge=0)
    """Run the experiment's evaluation (sampled responses only) every N steps, for the curves of the report
    (0: only at the end). The last step's is the final evaluation in the manifest, not a second one."""
    save_every: int = logging_only(10, ge=0)
    """Write a resumable checkpoint every N steps (0: never)."""

    def __post_init__(self) -> None:
        if self.rewards is None:
            self.rewards = {"reward": 1.0}
        self.reuse_required = self.reuse_rollout_forward is True  # not a field: true as set, not as resolved
        if self.reuse_rollout_forward is None:
            self.reuse_rollout_forward = self.one_pass_update
        if self.share_prompts is None:
            self.share_prompts = self.pack_sequences and self.samples_per_prompt > 1
        if self.share_prompts and not self.pack_sequences:
            raise ValueError("share_prompts: true packs each shared prompt once, which needs pack_sequences: true; "
                             "set share_prompts: false (or leave it unset) or pack_sequences: true")
        if self.sampler_logprobs is None:
            self.sampler_logprobs = not (self.reuse_rollout_forward or self.sampler_logprobs_refused)
        self.shared_prefill_required = self.shared_prefill is True  # not a field, as reuse_required
        if self.shared_prefill is None:
            self.shared_prefill = self.samples_per_prompt > 1 and self.rollout_engine == "hf"
        if not self.rewards:
            raise ValueError("rewards: empty; name at least one reward model or function, e.g. {reward: 1.0}")
        bad = {k: w for k, w in self.rewards.items() if not math.isfinite(float(w))}
        if bad:
            raise ValueError(f"rewards: the weight of {next(iter(bad))!r} is {next(iter(bad.values()))}; weights must "
                             "be finite numbers")
        if self.lora.enabled and self.lora.dropout:
            # the rollout samples and scores in eval mode, the update runs in train mode where adapter dropout is on
            raise ValueError(f"lora.dropout: {self.lora.dropout} must be 0 in PPO: the update would train a policy "
                             "with adapter dropout on, which is not the policy that sampled the rollout; set it to 0")
        estimator = ESTIMATORS[self.estimator]
        if self.whiten_rewards and estimator.reads_raw_scores:
            raise ValueError(f"whiten_rewards: true with estimator: {self.estimator} would take the group's mean "
                             "raw score off rewards that whitening rescaled and shifted, so the group means would "
                             "not cancel (REINFORCE++ whitens its returns itself); set whiten_rewards: false")
        if self.whiten_advantages and estimator.whitening_distorts:
            raise ValueError(f"whiten_advantages: true would whiten the {self.estimator} estimator's advantages "
                             "again over the batch, taking a token-weighted mean off group-centred advantages (and "
                             "rescaling Dr. GRPO's, which are deliberately not divided by a std); set "
                             "whiten_advantages: false (stages.grpo's default)")
        if self.adaptive_kl and self.kl_coef == 0:
            raise ValueError("kl_coef: 0 with adaptive_kl: true; the adaptive controller multiplies the coefficient, "
                             "so from 0 it stays 0 (with a reference model loaded for nothing); start it from a "
                             "positive kl_coef, e.g. 0.05, or turn adaptive_kl off")
        need = estimator.min_group_size
        if self.samples_per_prompt < need:
            raise ValueError(f"samples_per_prompt: {self.samples_per_prompt}; the {self.estimator} estimator compares "
                             f"responses to the same prompt and needs at least {need}")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"samples_per_prompt ({self.samples_per_prompt})")
        if self.policy_loss == "cispo" and self.clip_range_high is None:
            raise ValueError("policy_loss: cispo caps its importance weight at 1 + clip_range_high; set "
                             "clip_range_high (e.g. 4.0: a cap of 5, as ScaleRL recommends)")
        if self.importance_lower is not None and self.importance_correction == "none":
            raise ValueError("importance_lower is set but importance_correction: none applies no bound; pick a "
                             "correction mode or drop importance_lower")
        if self.reuse_rollout_forward and not self.one_pass_update:
            raise ValueError(f"reuse_rollout_forward: true needs the update to be one pass over the whole rollout "
                             f"batch (ppo_epochs: 1, num_minibatches: 1, gradient_accumulation_steps: 1), not "
                             f"{self.ppo_epochs}, {self.num_minibatches}, {self.gradient_accumulation_steps}")
        if self.sampler_logprobs and self.sampler_logprobs_refused:
            raise ValueError(f"sampler_logprobs: true needs the rollout drawn by the training policy itself in "
                             f"float32 ({self.sampler_logprobs_refused}); set it to false or leave it unset")
        if self.shared_prefill and self.rollout_engine != "hf":
            raise ValueError(f"shared_prefill: true applies to rollout_engine: hf; {self.rollout_engine} runs its own "
                             "prefill (vLLM: engine_options {enable_prefix_caching: true}); drop shared_prefill")
        if self.sampler_logprobs and self.reuse_rollout_forward:
            raise ValueError("sampler_logprobs: true with reuse_rollout_forward: true; the kept forward gives the "
                             "old log-probabilities already; set one of them to false")
        per_epoch = self.num_minibatches * self.gradient_accumulation_steps
        if self.rollout_batch_size % per_epoch:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must divide evenly into num_minibatches "
                f"({self.num_minibatches}) x gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )

    @property
    def one_pass_update(self) -> bool:
        """The update is one micro-batch holding the whole rollout batch, at the weights that sampled it."""
        return (self.ppo_epochs, self.num_minibatches, self.gradient_accumulation_steps) == (1, 1, 1)

    @property
    def sampler_logprobs_refused(self) -> str:
        """Why the sampler's log-probabilities are not the training policy's own in float32 ('' where they are)."""
        return "; ".join(why for refused, why in (
            (self.rollout_engine != "hf", f"rollout_engine: {self.rollout_engine} samples with weights of its own"),
            (self.max_staleness > 0, f"max_staleness: {self.max_staleness} samples with older weights"),
            (self.bf16_sampling, "bf16_sampling: true samples in bfloat16")) if refused)

    @property
    def minibatch_size(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps

    @property
    def uses_reference(self) -> bool:
        """Whether a KL to the reference is computed at all (a fixed coefficient of 0 needs no reference)."""
        return self.kl_coef > 0 or self.adaptive_kl

    def memory_plan(self):
        """The models, batch sizes and lengths of this stage, for `rlhf plan --memory` (rlhf/memory.py)."""
        from rlhf.memory import RLMemoryPlan
        from rlhf.rewards import model_sources

        rewards = model_sources(self.rewards)
        value = (self.value_model or (rewards or [self.policy])[0]) if ESTIMATORS[self.estimator].needs_values else None
        return RLMemoryPlan(policy=self.policy, rewards=rewards, value=value,
                            rollout_batch_size=self.rollout_batch_size, micro_batch_size=self.micro_batch_size,
                            response_tokens=self.max_new_tokens,
                            prompt_tokens=self.max_prompt_tokens, prompt_tokens_setting="max_prompt_tokens",
                            lora=(self.lora.r, len(self.lora.target_modules)) if self.lora.enabled else None,
                            reference=self.uses_reference)
