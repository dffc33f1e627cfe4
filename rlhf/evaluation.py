"""Held-out evaluation of a policy: judge scores, KL to the reference, fluency, samples."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from rlhf.ppo.core import masked_sum, response_mask_from_eos
from rlhf.ppo.rollout import policy_forward
from rlhf.sampling import batches, encode_prompts


@torch.no_grad()
def evaluate_policy(
    policy,
    tokenizer,
    prompts: list[str],
    judges: dict[str, Callable[[list[str], list[str]], list[float]]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    reference=None,
    reference_context: Callable[[], AbstractContextManager] = nullcontext,
    batch_size: int = 64,
) -> dict:
    """Sample one response per prompt (seeded, without disturbing the caller's RNG) and measure it.

    Returns per-prompt lists (`responses`, one list per judge, `kl`, `length`, `ended`) so callers can
    compare two policies prompt by prompt. KL is the summed per-token log-ratio to `reference` (or to
    `policy` itself inside `reference_context`, for LoRA's adapters-off reference).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = policy.training
    policy.eval()
    out: dict[str, list] = {"responses": [], "kl": [], "length": [], "ended": []}
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in batches(prompts, batch_size):
            enc = encode_prompts(tokenizer, chunk, policy.device)
            seqs = policy.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                   top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)
            q_ids, q_mask = enc["input_ids"], enc["attention_mask"].bool()
            r_ids = seqs[:, q_ids.shape[1] :]
            r_mask = response_mask_from_eos(r_ids, eos)
            logp, _ = policy_forward(policy, q_ids, q_mask, r_ids, r_mask, temperature)
            with reference_context():
                ref_logp, _ = policy_forward(reference or policy, q_ids, q_mask, r_ids, r_mask, temperature)
            out["kl"] += masked_sum(logp - ref_logp, r_mask, dim=1).tolist()
            out["length"] += r_mask.sum(1).tolist()
            out["ended"] += (r_ids == eos).any(1).tolist()
            for ids, mask in zip(r_ids, r_mask):
                out["responses"].append(tokenizer.decode(ids[mask], skip_special_tokens=True).strip())
    policy.train(was_training)
    for name, judge in judges.items():
        out[name] = [float(s) for s in judge(prompts, out["responses"])]
    return out


def summarize(results: dict, judges: list[str]) -> dict[str, float]:
    """Means of the per-prompt lists of `evaluate_policy`."""
    n = len(results["responses"])
    summary = {name: sum(results[name]) / n for name in judges}
    summary["kl"] = sum(results["kl"]) / n
    summary["response_length"] = sum(results["length"]) / n
    summary["eos_rate"] = sum(results["ended"]) / n
    return summary
