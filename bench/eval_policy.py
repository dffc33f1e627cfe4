"""The one measure of "reward reached" for every framework: sample one response per held-out prompt
from a saved policy (seeded, the training temperature and length) and read the reward model's score at
the EOS token, exactly as the PPO stage does. Also reports the gold judge, EOS rate and length.
Runs in the project's virtualenv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_prompts, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--prompts", required=True, help="held-out prompts (.jsonl.gz)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--judge", default="word_vader")
    p.add_argument("--json")
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.judges import load_judge
    from rlhf.ppo import response_mask_from_eos
    from rlhf.rollout import score_at_eos
    from rlhf.sampling import batches, encode_prompts, generate, generation_config
    from rlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(a.policy)
    policy = AutoModelForCausalLM.from_pretrained(a.policy).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward).eval()
    prompts = read_prompts(a.prompts, a.num_prompts)
    config = generation_config(tok, max_new_tokens=a.response_length, temperature=a.temperature)
    scores, ended, lengths, texts = [], [], [], []
    torch.manual_seed(a.seed)
    with torch.no_grad():
        for chunk in batches(prompts, 64):
            enc = encode_prompts(tok, chunk)
            seqs = generate(policy, config, **enc)
            q_ids, q_mask = enc["input_ids"], enc["attention_mask"].bool()
            r_ids = seqs[:, q_ids.shape[1]:]
            r_mask = response_mask_from_eos(r_ids, tok.eos_token_id)
            r_ids = torch.where(r_mask, r_ids, tok.pad_token_id)
            scores += score_at_eos(reward, q_ids, q_mask, r_ids, r_mask).tolist()
            ended += (r_ids == tok.eos_token_id).any(1).tolist()
            lengths += r_mask.sum(1).tolist()
            texts += [tok.decode(ids[m], skip_special_tokens=True).strip() for ids, m in zip(r_ids, r_mask)]
    gold = load_judge(a.judge, "--judge")(prompts, texts)
    n = len(prompts)
    write_result(a.json, {
        "policy": a.policy, "prompts": n, "reward": sum(scores) / n, "gold": sum(gold) / n,
        "eos_rate": sum(ended) / n, "length": sum(lengths) / n, "samples": texts[:3],
    })


if __name__ == "__main__":
    main()
