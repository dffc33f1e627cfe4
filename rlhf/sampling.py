"""Sampling responses from a causal LM through its chat template (evaluation, on-policy pairs, chat).

Prompts are left-padded so every row's last prompt token sits at the same position and generation
appends to all rows at once; `generate` derives position ids from the attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One generated response."""

    prompt: str
    response: str
    ended: bool
    """True when the model emitted EOS before max_new_tokens."""
    num_tokens: int
    """Response tokens up to and including EOS."""


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat-template rendering of one user turn, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_prompts(tokenizer, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Left-padded input ids and attention mask for chat prompts (BOS comes from the template)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) if device is not None else v for k, v in enc.items()}


def generation_kwargs(tokenizer, *, max_new_tokens: int, temperature: float, top_p: float = 1.0) -> dict:
    """`generate` arguments for plain sampling at `temperature` (greedy at 0), nothing else."""
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **sampling}


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[Sample]:
    """Sample one response per prompt (greedy when temperature is 0)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[Sample] = []
    chunks = list(batches(prompts, batch_size))
    for chunk in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) < 2):
        enc = encode_prompts(tokenizer, chunk, model.device)
        kwargs = {"do_sample": False} if temperature == 0 else {
            "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0,
        }
        seqs = model.generate(
            **enc, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **kwargs
        )
        responses = seqs[:, enc["input_ids"].shape[1] :]
        for prompt, ids in zip(chunk, responses.tolist()):
            ended = eos in ids
            ids = ids[: ids.index(eos) + 1] if ended else ids
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Sample(prompt, text, ended, len(ids)))
    model.train(was_training)
    return out
