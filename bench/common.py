"""Helpers every benchmark script shares. Plain Python only: it is imported from the project's
virtualenv and from the bench virtualenv (TRL 1.12.0), so it must not import the project."""

from __future__ import annotations

import gzip
import json
import resource
import sys
from pathlib import Path


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The "prompt" field of a (gzipped) JSON-lines file, in file order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return rows[:limit] if limit else rows


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(path: str | None, result: dict) -> None:
    """One JSON object per run, read back by bench/run.py."""
    text = json.dumps(result, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(text, file=sys.stderr)


def add_ppo_args(p) -> None:
    """The hyperparameters both PPO implementations receive, under one name each."""
    p.add_argument("--policy", required=True, help="SFT policy directory (also the reference)")
    p.add_argument("--reward", required=True, help="reward-model directory (the value model starts from it)")
    p.add_argument("--prompts", required=True, help="training prompts (.jsonl.gz)")
    p.add_argument("--out", required=True, help="directory for the final policy")
    p.add_argument("--json", help="where to write the result")
    p.add_argument("--steps", type=int, default=20, help="PPO iterations")
    p.add_argument("--batch", type=int, default=64, help="prompts per rollout")
    p.add_argument("--minibatches", type=int, default=4, help="minibatches per PPO epoch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per minibatch")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per rollout")
    p.add_argument("--response-length", type=int, default=32, help="max new tokens")
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4, help="policy and value learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
