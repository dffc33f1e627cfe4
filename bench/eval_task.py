"""The one measure of "reward reached" for GRPO, for every framework: sample responses to held-out
prompts from a saved policy (the first N rows of the prompts file, K responses each, seeded, the training
temperature and length, through our chat template and sampling) and score them with the training's reward
function, by default the task's check `uses_word` (tasks/words.py; the rows' "word" column names the
word); the reward is their mean. Also reports the EOS rate and the mean length. One response to each of
256 prompts leaves ~0.03 of sampling noise in the score, more than GRPO runs differ by; `make bench`
scores 4 responses to each of 512. Runs in the project's virtualenv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_rows, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--policy", required=True)
    p.add_argument("--prompts", required=True, help='held-out prompts (.jsonl.gz of {"prompt", "word"} rows)')
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--samples-per-prompt", type=int, default=1, help="responses drawn per prompt (default 1)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reward", default="uses_word", help="a judge's name (rlhf/judges.py, or registered: tasks/words.py)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.samples_per_prompt < 1:
        p.error(f"--samples-per-prompt {a.samples_per_prompt}: must be at least 1")
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.judges import load_judge
    from rlhf.sampling import sample
    from rlhf.tokenizer import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.policy)
    policy = AutoModelForCausalLM.from_pretrained(a.policy).to(device).eval()
    rows = [r for r in read_rows(a.prompts, a.num_prompts) for _ in range(a.samples_per_prompt)]
    prompts = [r["prompt"] for r in rows]
    torch.manual_seed(a.seed)
    samples = sample(policy, tok, prompts, max_new_tokens=a.response_length, temperature=a.temperature)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = load_judge(a.reward, "--reward")(prompts, [s.response for s in samples], **columns)
    n = len(rows)
    write_result(a.json, {
        "policy": a.policy, "reward_function": a.reward, "prompts": n // a.samples_per_prompt,
        "samples_per_prompt": a.samples_per_prompt, "reward": sum(scores) / n,
        "eos_rate": sum(s.ended for s in samples) / n,
        "length": sum(s.num_tokens for s in samples) / n, "samples": [s.response for s in samples[:3]],
        "scores": [float(x) for x in scores],
    })


if __name__ == "__main__":
    main()
