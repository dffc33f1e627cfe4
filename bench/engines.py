"""Rollout engines on a released model: GRPO on SmolLM2-135M-Instruct with `generate` (float32, bfloat16),
vLLM (float32, bfloat16) and `generate` one step off-policy, each a few steps of the same run, one after the
other on the same cores. Writes bench/out/engines/<variant>.json and prints a markdown table.

Every variant runs bench/grpo_ours.py (only the training loop is timed) in .venv-vllm (make vllm-setup),
so that all of them use the same library versions. The settings are configs/smol.yaml's GRPO (LoRA r 16 on
every projection, 8 prompts x 4 responses of at most 48 tokens at temperature 0.7) rewarded by the task
check `uses_word`, without the reward model. The policy is SmolLM2 as `make smol` converts it into the store
(`--policy`, default: the store's smol source artifact).

    .venv-vllm/bin/python bench/engines.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

VARIANTS = {
    "hf-fp32": [],
    "hf-bf16": ["stages.grpo.bf16_sampling=true"],
    "vllm-fp32": ["stages.grpo.rollout_engine=vllm"],
    "vllm-bf16": ["stages.grpo.rollout_engine=vllm", "stages.grpo.bf16_sampling=true"],
    "hf-fp32-ahead1": ["stages.grpo.max_staleness=1"],
}
LORA = ["stages.grpo.lora.enabled=true", "stages.grpo.lora.r=16", "stages.grpo.lora.alpha=32",
        "stages.grpo.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


def smol_source() -> Path:
    """The store's SmolLM2 conversion (`make smol` makes it): the starting policy of the smol experiment's GRPO."""
    store = REPO / "artifacts" / "artifacts"
    grpo = json.loads((store / (REPO / "artifacts/aliases/smol/grpo").read_text().strip() / "manifest.json").read_text())
    return store / grpo["inputs"]["policy"]["key"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, help="SmolLM2 as a Hugging Face directory (default: the store's)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=HERE / "out" / "engines")
    a = ap.parse_args()
    policy = a.policy or smol_source()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.only:
        out = a.out / name
        cmd = [sys.executable, str(HERE / "grpo_ours.py"), "--policy", str(policy), "--out", str(out),
               "--prompts", str(REPO / "data/prompts/train.jsonl.gz"), "--json", str(a.out / f"{name}.json"),
               "--steps", str(a.steps), "--prompts-per-step", "8", "--group-size", "4", "--response-length", "48",
               "--temperature", "0.7", "--lr", "3e-4", "--set", *LORA, *VARIANTS[name]]
        start = time.time()
        with open(a.out / f"{name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)
    print(table([json.loads((a.out / f"{n}.json").read_text()) | {"name": n} for n in a.only
                 if (a.out / f"{n}.json").exists()]))


def table(results: list[dict]) -> str:
    phases = ["time/rollout", "time/policy_forward", "time/reference_forward", "time/score", "time/update"]
    head = ("| variant | completions/s | new tokens/s (rollout) | " + " | ".join(p[5:] for p in phases)
            + " | train reward, first -> last 2 steps | mismatch KL | tokens truncated |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        t, m, rewards = r["time"], r.get("mismatch", {}), r["train_rewards"]
        per = {p: t.get(p, 0.0) / r["steps"] for p in phases}
        lines.append(
            f"| {r['name']} | {r['completions_per_s']:.2f} | {r['generated_tokens'] / t['time/rollout']:.0f} | "
            + " | ".join(f"{per[p]:.1f} s" for p in phases)
            + f" | {rewards[0]:.2f} -> {sum(rewards[-2:]) / 2:.2f} | "
            + (f"{m['rollout/mismatch_kl']:.1e} | {m.get('rollout/truncated_share', 0):.3f} |" if m else "- | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
