"""Models: build from a config, load from an artifact, a local directory or the hub, and check reloads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.stage import StageError


@dataclass
class ModelConfig:
    """A Llama-architecture decoder built from scratch (pretraining only; later stages load checkpoints)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = num_heads."""
    intermediate_size: int = 512
    """Width of the SwiGLU feed-forward layer."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embeddings are set up for."""
    tie_word_embeddings: bool = True
    """Share input embeddings and output projection (halves embedding parameters in a tiny model)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")


def build_causal_lm(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM sized by `cfg`, with the tokenizer's special-token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def external_fingerprint(ref: str) -> str:
    """Identity of a model from outside the store, for artifact keys.

    A local directory is fingerprinted by its config and the names and sizes of its files (hashing
    gigabytes of weights on every plan would be slow); a hub id by its name, since the user pins a
    revision by naming it (`owner/model@rev`).
    """
    path = Path(ref)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
                if f.suffix == ".json" and f.stat().st_size < 1 << 20:
                    h.update(f.read_bytes())
        return "dir:" + h.hexdigest()[:16]
    return "hub:" + ref


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
    expected = _first_output(model(input_ids=ids))
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


def _first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
