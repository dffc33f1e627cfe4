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
    ap.add_argument("--env", nargs="*", default=[], help="NAME=VALUE settings for every variant's process")
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="then sample each trained policy on the first N held-out prompts (bench/eval_task.py) and set "
                         "its task success against the first variant's, with a paired-bootstrap 95%% interval")
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
                           env={**os.environ, "HF_HUB_OFFLINE": "1", **dict(e.split("=", 1) for e in a.env)})
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)
        if a.eval:
            subprocess.run([sys.executable, str(HERE / "eval_task.py"), "--policy", str(out / "policy"),
                            "--prompts", str(REPO / "data/prompts/eval.jsonl.gz"), "--num-prompts", str(a.eval),
                            "--response-length", "48", "--temperature", "0.7", "--json",
                            str(a.out / f"{name}.eval.json")], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if a.eval:
        print(held_out([(n, json.loads((a.out / f"{n}.eval.json").read_text())) for n in a.only]))
    print(table([json.loads((a.out / f"{n}.json").read_text()) | {"name": n} for n in a.only
                 if (a.out / f"{n}.json").exists()]))


def held_out(evals: list[tuple[str, dict]]) -> str:
    """Each variant's held-out task success, and its difference from the first variant's with a paired
    bootstrap 95% interval over the prompts (the same prompts and sampling seed for every variant)."""
    import random

    base = evals[0][1]["scores"]
    lines = ["| variant | held-out task success | difference from " + evals[0][0] + " (95% CI) |", "|---|---|---|"]
    for name, e in evals:
        d = [x - y for x, y in zip(e["scores"], base)]
        rng = random.Random(0)
        boot = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(2000))
        lines.append(f"| {name} | {e['reward']:.3f} | {sum(d) / len(d):+.3f} ({boot[50]:+.3f}, {boot[1949]:+.3f}) |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    phases = ["time/rollout", "time/policy_forward", "time/reference_forward", "time/score", "time/update", "time/sync"]
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
