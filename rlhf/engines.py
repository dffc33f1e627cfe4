"""Rollout engines: where the RL loop's responses are sampled.

An engine takes the step's chat prompts and returns a `Rollout` in the layout every forward of the loop
reads (rlhf/rollout.py): prompts left-padded, responses right-padded with pad ids after the first EOS,
the response mask, and the log-probabilities the engine sampled with where it computes them itself. After
every policy update the loop calls `sync(policy)`, so the next rollout samples from the new weights.

    hf   `generate` on the training policy itself (the default): the sampler is the trained model, so
         there is nothing to sync and no mismatch between sampling and training probabilities to correct.

An engine is chosen by name (`ENGINES`, the RL stage's `rollout_engine`); a new one subclasses
`RolloutEngine` and implements `sample` (and `sync` when it holds its own copy of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlhf.ppo.core import response_mask_from_eos
from rlhf.sampling import encode_prompts, generate, generation_config


class Rollout(NamedTuple):
    """One rollout batch as sampled. B = prompts, P = padded prompt length, R = padded response length."""

    query_ids: torch.Tensor
    """(B, P) left-padded prompt ids."""
    query_mask: torch.Tensor
    """(B, P) bool; True = a real prompt token."""
    response_ids: torch.Tensor
    """(B, R) sampled ids, pad after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) bool; True = a real response token (up to and including the first EOS)."""
    logprobs: torch.Tensor | None = None
    """(B, R) the engine's log-probabilities of the sampled tokens (None: the trainer's forward is the sampler)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How rollouts are sampled: at most `max_new_tokens`, at `temperature` with nucleus `top_p`, and
    (`bf16`) under bfloat16 autocast."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    bf16: bool = False


class RolloutEngine:
    """Samples responses to chat prompts with the policy's current weights."""

    name = ""

    def __init__(self, tokenizer, launch, settings: SamplingSettings):
        self.tokenizer, self.launch, self.settings = tokenizer, launch, settings

    def sample(self, prompts: list[str]) -> Rollout:
        """One response per prompt (repeat a prompt for several)."""
        raise NotImplementedError

    def sync(self, policy) -> None:
        """Bring the engine's weights up to `policy`'s after an update (nothing for an engine that samples
        from the trained model itself)."""


class HFEngine(RolloutEngine):
    """`generate` on the training policy (unwrapped, with ZeRO-3's shards gathered: `RLLaunch`)."""

    name = "hf"

    @torch.no_grad()
    def sample(self, prompts: list[str]) -> Rollout:
        tok, s = self.tokenizer, self.settings
        enc = encode_prompts(tok, prompts, self.launch.accelerator.device)
        with self.launch.generation_model() as policy:
            policy.eval()
            # these settings alone: the checkpoint's generation_config must not reshape what is sampled
            config = generation_config(tok, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
            seqs = generate(policy, config, bf16=s.bf16, **enc, **self.launch.generate_extra())
        query_ids = enc["input_ids"]
        response_ids = seqs[:, query_ids.shape[1] :]
        response_mask = response_mask_from_eos(response_ids, tok.eos_token_id)
        # generate pads finished rows with pad ids; make that explicit for rows that never ended too
        response_ids = torch.where(response_mask, response_ids, tok.pad_token_id)
        return Rollout(query_ids, enc["attention_mask"].bool(), response_ids, response_mask)


ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFEngine}
