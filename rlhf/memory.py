"""How much memory an RL run needs per process, before it runs: `rlhf plan CONFIG --memory [--launch FILE]`.

`estimate_ppo_memory` is a pure function of model shapes and launch settings. Per process, in bytes:

    trained models (policy, and the value model where the estimator has one: GAE), per parameter:
        weights     4 (fp32; Accelerate's bf16 autocast keeps fp32 weights)   DeepSpeed bf16: 2
        gradients   4                                                         DeepSpeed bf16: 2
        AdamW       8 (m and v in fp32)                          DeepSpeed bf16: 12 (+ fp32 master copy)
      sharded over N processes: ZeRO-1 the optimizer state; ZeRO-2 also gradients; ZeRO-3 and FSDP
      everything. LoRA: gradients and optimizer state only for the adapters.
    frozen models (reference, reward models): 2 bytes per parameter when training in bf16 on GPU, else 4;
      sharded over N under ZeRO-3 (no reference with LoRA, the policy with adapters off, nor without a
      KL term; no reward model for rewards that are all functions).
    KV cache of generation: 2 (K and V) x layers x kv_heads x head_dim x (prompt + response tokens)
      x rollout rows per process x bytes per value (2 in bf16, else 4).
    ZeRO-3 generation gathers the whole policy: params x weight bytes for the duration.
    logits of a training micro-batch: micro-batch rows per process x (response + 1) x vocab x 4
      (the LM head runs over the response columns only; logprobs are taken in fp32).

Left out: other activations (they grow with micro-batch size and sequence length; lower
`gradient_accumulation_steps`' micro-batch if a run that fits on paper runs out of memory), the CUDA
context (~0.5 GiB) and allocator fragmentation. The estimate is a floor, not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
DEFAULT_PROMPT_TOKENS = 256
"""The prompt length a plan assumes when neither the command line nor the stage's own bound says."""


@dataclass(frozen=True)
class RLMemoryPlan:
    """What an RL stage tells the memory plan about itself (`Stage.memory_plan`). Models are named as in the
    stage's config: an upstream stage, a hub id or a local directory."""

    policy: str
    """The model the stage trains."""
    rewards: list[str]
    """The reward models it scores with ([] when every reward is a function)."""
    value: str | None
    """The model its value model starts from; None for an estimator without one."""
    rollout_batch_size: int
    """Rollout rows per step, over all processes."""
    micro_batch_size: int
    """Rows per training forward, over all processes."""
    response_tokens: int
    """The longest response it generates."""
    prompt_tokens: int | None = None
    """Its bound on prompt length; None: the plan assumes `--prompt-tokens`."""
    prompt_tokens_setting: str = "max_prompt_tokens"
    """The setting of its block that bounds prompt length (named in the plan's note)."""
    lora: tuple[int, int] | None = None
    """(rank, number of target modules) when it trains LoRA adapters; None: the whole policy."""
    reference: bool = True
    """Whether it holds a frozen reference (False without a KL term)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    params: int
    """Number of parameters (unique tensors; tied embeddings counted once)."""
    num_layers: int
    """Transformer blocks (KV cache)."""
    num_kv_heads: int
    """Key/value heads per block (KV cache)."""
    head_dim: int
    """Width of one attention head (KV cache)."""
    vocab_size: int
    """Vocabulary (logits)."""
    hidden_size: int
    """Residual width (LoRA adapter sizes)."""


@dataclass(frozen=True)
class LaunchSettings:
    """The parts of an Accelerate launch config that decide memory."""

    num_processes: int = 1
    """Processes (GPUs) the work is split over."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage; 0 without DeepSpeed."""
    fsdp: bool = False
    """FSDP full sharding."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16'."""
    gpu: bool = True
    """Frozen models are cast to bf16 only on GPU."""
    name: str = "one process"
    """How the launch is described in the table."""

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0


@dataclass
class MemoryEstimate:
    """Bytes per process, by item, and parameter counts for the table."""

    rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    """The prompt length the estimate assumed."""
    stage: str = ""
    """The stage it is for."""
    prompt_bound: str = ""
    """The stage's setting that gave `prompt_tokens` (`stages.<stage>.max_prompt_tokens`); "" when the plan
    assumed it."""

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def lora_params(shape: ModelShape, r: int, num_target_modules: int) -> int:
    """Adapter parameters: each target linear (taken as hidden x hidden) gets A (r x hidden) and B (hidden x r)."""
    return shape.num_layers * num_target_modules * 2 * r * shape.hidden_size


def estimate_ppo_memory(
    policy: ModelShape,
    reward: ModelShape | list[ModelShape] | None,
    launch: LaunchSettings,
    *,
    rollout_batch_size: int,
    micro_batch_size: int,
    prompt_tokens: int,
    response_tokens: int,
    lora_trainable: int | None = None,
    value: ModelShape | None | bool = True,
    reference: bool = True,
) -> MemoryEstimate:
    """Bytes per process of an RL run (see the module docstring for every term).

    `reward`: the reward model's shape, several (a list), or None when every reward is a function.
    `value`: the value model's shape, True for the shape of the (first) reward model, or None/False for
    an estimator without one. `reference`: whether a frozen reference is held (False without a KL term).
    `rollout_batch_size` and `micro_batch_size` are global (over all processes), as in an RL stage's config;
    `lora_trainable` is the adapter parameter count when the policy trains LoRA adapters (its reference
    is then the policy itself with adapters off, so there is no reference copy).
    """
    rewards = reward if isinstance(reward, list) else [reward] if reward is not None else []
    if value is True:
        value = rewards[0] if rewards else policy
    n = launch.num_processes
    bf16 = launch.mixed_precision == "bf16"
    ds_bf16 = launch.deepspeed and launch.mixed_precision in ("bf16", "fp16")
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if ds_bf16 else (4, 4, 8)
    shard_w = n if (launch.zero_stage == 3 or launch.fsdp) else 1
    shard_g = n if (launch.zero_stage >= 2 or launch.fsdp) else 1
    shard_o = n if (launch.zero_stage >= 1 or launch.fsdp) else 1
    frozen_bytes = 2 if (bf16 and launch.gpu) else 4
    shard_frozen = n if launch.zero_stage == 3 else 1
    kv_bytes = 2 if bf16 else 4
    seq = prompt_tokens + response_tokens

    est = MemoryEstimate()
    trained = {"policy": (policy.params, lora_trainable if lora_trainable is not None else policy.params)}
    if value:
        trained["value"] = (value.params, value.params)
    for name, (params, trainable) in trained.items():
        est.params[name] = params
        est.rows[f"{name} weights"] = params * w_bytes // shard_w
        est.rows[f"{name} gradients"] = trainable * g_bytes // shard_g
        est.rows[f"{name} optimizer state (AdamW)"] = trainable * o_bytes // shard_o
    if lora_trainable is None and reference:
        est.params["reference"] = policy.params
        est.rows["reference (frozen)"] = policy.params * frozen_bytes // shard_frozen
    for i, shape in enumerate(rewards):
        name = "reward model" if len(rewards) == 1 else f"reward model {i + 1}"
        est.params[name] = shape.params
        est.rows[f"{name} (frozen)"] = shape.params * frozen_bytes // shard_frozen
    rows_per_process = rollout_batch_size // n
    est.rows["KV cache (generation)"] = (2 * policy.num_layers * policy.num_kv_heads * policy.head_dim * seq
                                         * rows_per_process * kv_bytes)
    if launch.zero_stage == 3:
        est.rows["policy gathered for generation"] = policy.params * w_bytes
    est.rows["logits (training micro-batch)"] = (max(micro_batch_size // n, 1) * (response_tokens + 1)
                                                 * policy.vocab_size * 4)
    return est


# ---- reading shapes and launch settings ----------------------------------------------------------


def shape_from_config(config, sequence_classification: bool = False) -> ModelShape:
    """A ModelShape from a transformers config, counting parameters on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if sequence_classification:
            fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
            config = type(config).from_dict({**fields, "num_labels": 1})
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    heads = config.num_attention_heads
    return ModelShape(
        params=params,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
    )


def launch_settings(path: str | None) -> LaunchSettings:
    """LaunchSettings from an Accelerate launch YAML (None: one process, no mixed precision)."""
    import torch

    if path is None:
        return LaunchSettings(gpu=torch.cuda.is_available())
    from rlhf.distributed import read_launch_config

    cfg = read_launch_config(path)
    kind = cfg["distributed_type"]
    zero = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0)) if kind == "DEEPSPEED" else 0
    fsdp = kind == "FSDP"
    n = int(cfg.get("num_processes", 1))
    what = f"ZeRO-{zero}" if zero else "FSDP" if fsdp else {"MULTI_GPU": "DDP", "MULTI_CPU": "CPU DDP"}.get(kind, kind)
    return LaunchSettings(num_processes=n, zero_stage=zero, fsdp=fsdp,
                          mixed_precision=str(cfg.get("mixed_precision", "no")), gpu=not cfg.get("use_cpu", False),
                          name=f"{Path(path).name}: {what}, {n} process(es), mixed precision {cfg.get('mixed_precision', 'no')}")


def model_config_for(pipeline, value: str, trained_by: str = ""):
    """The transformers config of the model a stage input names, without loading weights.

    An upstream stage's artifact if it exists; otherwise the model that stage starts from (for
    pretraining, the architecture its config describes); a hub id or local directory by its config.json.
    `trained_by` is the stage whose plan asks, for the message when none of these says.
    """
    from transformers import AutoConfig

    stage = pipeline.stages.get(value)
    if stage is None:
        return AutoConfig.from_pretrained(value)
    if pipeline.store.exists(stage.key):
        return AutoConfig.from_pretrained(str(pipeline.store.local_dir(stage.key)))
    from rlhf.models import ModelConfig, llama_config

    model_cfg = getattr(stage.config, "model", None)
    if isinstance(model_cfg, ModelConfig):  # a model trained from scratch (pretraining)
        return llama_config(model_cfg, vocab_size=stage.config.tokenizer.vocab_size)
    for fname in type(stage).inputs:
        upstream = getattr(stage.config, fname, None)
        if upstream:
            return model_config_for(pipeline, upstream, trained_by)
    raise ValueError(f"{pipeline.experiment.source}: stages.{value}: cannot tell which model this stage trains "
                     f"(no model config and no input model); name a hub id or local directory as the model "
                     f"stages.{trained_by or value} starts from")


def available_memory(launch: LaunchSettings) -> tuple[int, str]:
    """(bytes, where) one process can use: the GPU's memory, or on CPU the RAM shared by all processes."""
    import torch

    if launch.gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} (cuda:0)"
    import psutil

    where = "system RAM" + (f" / {launch.num_processes} processes" if launch.num_processes > 1 else "")
    if launch.gpu:
        where += " (no GPU here)"
    return psutil.virtual_memory().total // launch.num_processes, where


def plan_memory(pipeline, launch_file: str | None, prompt_tokens: int) -> tuple[MemoryEstimate, LaunchSettings]:
    """The memory per process of the stage of `pipeline` that describes its memory (`Stage.memory_plan`; the
    last one, if several) under `launch_file`, estimated."""
    planned = [(s, plan) for s in pipeline.stages.values() if (plan := s.memory_plan()) is not None]
    if not planned:
        raise ValueError(f"{pipeline.experiment.source}: no stage under stages: describes its memory (RL stages do, "
                         f"through Stage.memory_plan); run `rlhf plan` without --memory")
    stage, p = planned[-1]
    launch = launch_settings(launch_file)
    policy = shape_from_config(model_config_for(pipeline, p.policy, stage.stage_name))
    rewards = [shape_from_config(model_config_for(pipeline, name, stage.stage_name), sequence_classification=True)
               for name in p.rewards]
    value = None
    if p.value is not None:
        value = shape_from_config(model_config_for(pipeline, p.value, stage.stage_name), sequence_classification=True)
    lora = lora_params(policy, *p.lora) if p.lora is not None else None
    prompt_tokens = p.prompt_tokens or prompt_tokens  # no prompt is longer than the stage's bound
    est = estimate_ppo_memory(policy, rewards, launch, rollout_batch_size=p.rollout_batch_size,
                              micro_batch_size=p.micro_batch_size, prompt_tokens=prompt_tokens,
                              response_tokens=p.response_tokens, lora_trainable=lora, value=value,
                              reference=p.reference)
    est.prompt_tokens, est.stage = prompt_tokens, stage.stage_name
    est.prompt_bound = f"stages.{stage.stage_name}.{p.prompt_tokens_setting}" if p.prompt_tokens else ""
    return est, launch


def _size(b: int) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB // 10 else f"{b / (1 << 20):.2f} MiB"


def format_table(est: MemoryEstimate, launch: LaunchSettings, available: tuple[int, str] | None) -> tuple[str, bool]:
    """The table `rlhf plan --memory` prints, and whether the run fits."""
    lines = [f"stages.{est.stage}: memory per process ({launch.name})", ""]
    for name, count in est.params.items():
        lines.append(f"  {name:<36} {count / 1e6:>12.2f}M parameters")
    lines.append("")
    for name, b in est.rows.items():
        lines.append(f"  {name:<36} {_size(b):>14}")
    lines.append(f"  {'total (a floor: see rlhf/memory.py)':<36} {_size(est.total):>14}")
    fits = True
    if available is not None:
        avail, where = available
        fits = est.total <= avail
        lines.append(f"  {'available: ' + where:<36} {_size(avail):>14}")
    return "\n".join(lines), fits
