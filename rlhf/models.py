"""Models: build from a config, load from an artifact, a local directory or the hub, and check reloads."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.errors import ConfigError, StageError
from rlhf.schema import checked


@dataclass
class ModelConfig:
    """A Llama-architecture decoder built from scratch (pretraining only; later stages load checkpoints)."""

    hidden_size: int = checked(128, ge=1)
    """Width of the residual stream."""
    num_layers: int = checked(4, ge=1)
    """Number of transformer blocks."""
    num_heads: int = checked(4, ge=1)
    """Attention heads per block."""
    num_kv_heads: int | None = checked(None, ge=1)
    """Key/value heads (grouped-query attention); None = num_heads."""
    intermediate_size: int = checked(512, ge=1)
    """Width of the SwiGLU feed-forward layer."""
    max_position_embeddings: int = checked(512, ge=1)
    """Longest sequence the rotary embeddings are set up for."""
    tie_word_embeddings: bool = True
    """Share input embeddings and output projection (halves embedding parameters in a tiny model)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                             f"({self.num_kv_heads}): each key/value head serves a whole group of query heads")


@dataclass
class LoraSettings:
    """LoRA adapters through peft."""

    enabled: bool = False
    """Train low-rank adapters instead of all weights."""
    r: int = checked(8, ge=1)
    """Adapter rank."""
    alpha: int = checked(16, ge=1)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = checked(0.0, ge=0, lt=1)
    """Dropout on the adapter input (PPO refuses anything but 0: its update would run another policy)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type=task_type)


def llama_config(cfg: ModelConfig, vocab_size: int, **special_token_ids):
    """The transformers LlamaConfig that `cfg` describes (also what the memory planner sizes)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **special_token_ids,
    )


def build_causal_lm(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM sized by `cfg`, with the tokenizer's special-token ids."""
    from transformers import LlamaForCausalLM

    config = llama_config(cfg, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


@contextlib.contextmanager
def whole_models():
    """Inside, transformers treats this process's models as its own, also in a ZeRO-3 run.

    Under ZeRO-3 a Trainer registers its DeepSpeed config with transformers for as long as it lives;
    transformers then builds every model inside `deepspeed.zero.Init` (partitioned at construction, a
    collective over all ranks) and makes `generate` step in lockstep with the other ranks (`synced_gpus`).
    Loading or sampling on the main process alone (the after-save check, on-policy sampling) would then
    wait forever for ranks that never join. The launch configs load whole and let DeepSpeed partition
    at `prepare` (`zero3_init_flag: false`), so every load goes through here too.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def load_causal_lm(path: str):
    """Load (model, tokenizer) from an artifact, local directory or hub id, ready for the pipeline.

    A tokenizer without a distinct pad token gets one (PPO must tell padding from EOS), and the
    embeddings grow to match; dropout is switched off because RLHF stages compare logprobs across passes.
    """
    from transformers import AutoModelForCausalLM

    from rlhf.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    with whole_models():
        model = AutoModelForCausalLM.from_pretrained(path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (modules and config), so repeated forwards agree exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if getattr(model.config, name, None):
            setattr(model.config, name, 0.0)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters."""
    # under ZeRO-3 a parameter holds only this rank's shard; `ds_numel` is its whole size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def probe_ids(tokenizer, length: int = 24) -> torch.Tensor:
    """A fixed batch of token ids for comparing a model with its reloaded checkpoint."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (2, length), generator=g)


@torch.no_grad()
def verify_reload(model: torch.nn.Module, path: Path, auto_class, tokenizer, atol: float = 1e-5) -> float:
    """Reload `path` with `auto_class` and compare its outputs with `model`; raise StageError on a mismatch.

    Catches checkpoints that load but are not the model that was trained (missing tied weights,
    a dropped head, a wrong dtype or config).
    """
    ids = probe_ids(tokenizer).to(model.device)
    was_training = model.training
    model.eval()
    # Accelerate's mixed precision wraps `forward` in autocast (keeping the original beside it); the
    # checkpoint holds the full-precision weights, so compare with the full-precision forward.
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward") if original is not None else None
    if wrapped is not None:
        model.forward = original
    try:
        expected = _first_output(model(input_ids=ids))
    finally:
        if wrapped is not None:
            model.forward = wrapped
    with whole_models():
        reloaded = auto_class.from_pretrained(str(path), dtype=model.dtype).to(model.device).eval()
    got = _first_output(reloaded(input_ids=ids))
    model.train(was_training)
    diff = (expected.float() - got.float()).abs().max().item()
    if not torch.isfinite(torch.tensor(diff)) or diff > atol:
        raise StageError(
            f"the checkpoint written to {path} does not reproduce the trained model "
            f"(max |difference| {diff:.3g} > {atol}); nothing was published"
        )
    return diff


def verify_saved_weights(path: Path, auto_class, state: dict[str, torch.Tensor]) -> None:
    """Reload `path` and compare its weights with `state` (a state dict gathered from sharded ranks,
    where the model in memory holds only this rank's shard and cannot be run for `verify_reload`)."""
    with whole_models():  # on the main process only
        saved = auto_class.from_pretrained(str(path)).state_dict()
    bad = [k for k, v in saved.items() if k in state and not torch.equal(v.cpu(), state[k].to(v.dtype).cpu())]
    missing = [k for k in state if k not in saved and not k.endswith("lm_head.weight")]  # tied heads are not saved
    if bad or missing:
        raise StageError(f"the checkpoint written to {path} does not hold the trained weights (differs in "
                         f"{bad[:3]}, missing {missing[:3]}); nothing was published")


def verify_checkpoint(model: torch.nn.Module, path: Path, auto_class, tokenizer,
                      gathered: dict[str, torch.Tensor] | None = None) -> None:
    """The after-save check of every stage: `verify_reload` (same logits as the model in memory), or,
    where ranks hold shards and `gathered` is the whole state they gathered, `verify_saved_weights`."""
    if gathered is not None:
        verify_saved_weights(path, auto_class, gathered)
    else:
        verify_reload(model, path, auto_class, tokenizer)


def _first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


# Plausible hub ids: `name` or `owner/name`, optionally `@revision`; anything else names a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")


def check_model_source(value: str, where: str, stage_names: list[str]) -> None:
    """A model input from outside the experiment, checked without loading or fetching it: a Hugging Face
    directory (with config.json), or a plausible hub id that is not a misspelt stage name (`stage_names`)
    and, offline (HF_HUB_OFFLINE=1), is in the local hub cache. Raises `ConfigError` starting with `where`."""
    import difflib
    import os

    path = Path(value).expanduser()
    fix = ("name an upstream stage, a local Hugging Face model directory, a .gguf file or a hub id "
           "such as EleutherAI/pythia-160m")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{where}: {value} has no config.json, so it is not a Hugging Face model "
                              f"directory; {fix}")
        return
    if path.exists():
        raise ConfigError(f"{where}: {value} is a file; {fix}")
    if value.startswith(("/", ".", "~")) or "\\" in value or not _HUB_ID.match(value):
        raise ConfigError(f"{where}: {value} does not exist (and is not a hub id); {fix}")
    # A hub id is not fetched here, but a misspelt stage name would be taken for one (and fail only when
    # its stage starts), and offline a hub id must already be in the cache.
    close = difflib.get_close_matches(value, stage_names, n=1, cutoff=0.75)
    if "/" not in value and close:
        raise ConfigError(f"{where}: {value} is not a stage of this experiment; did you mean {close[0]}? "
                          f"(to load a hub model of that name, give it with its owner, e.g. owner/{value})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = value.partition("@")
        if not isinstance(try_to_load_from_cache(repo, "config.json", revision=revision or None), str):
            raise ConfigError(f"{where}: {value} is not in the local hub cache and HF_HUB_OFFLINE is set, "
                              f"so it cannot be downloaded; download it once online, or {fix}")


def save_policy(model, tokenizer, out, state_dict: dict | None = None) -> None:
    """Write a causal LM that stops where the pipeline does: the tokenizer's pad and EOS ids in its
    generation config, the model (`state_dict`: the weights every rank gathered in a sharded run) and the
    tokenizer, into directory `out`."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out), state_dict=state_dict)
    tokenizer.save_pretrained(str(out))
