"""Helpers every benchmark script shares. Plain Python only: it is imported from the project's
virtualenv and from the bench virtualenv (TRL 1.12.0), so it must not import the project."""

from __future__ import annotations

import gzip
import json
import math
import resource
import statistics
import sys
from pathlib import Path


def read_rows(path: str, limit: int | None = None) -> list[dict]:
    """The rows of a (gzipped) JSON-lines file, in file order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The "prompt" field of a (gzipped) JSON-lines file, in file order."""
    return [row["prompt"] for row in read_rows(path, limit)]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib() -> float | None:
    """Peak memory torch allocated on the GPU in this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def difference(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """mean(xs) - mean(ys) and a 95% interval (Welch's standard error, normal quantile 1.96)."""
    (mx, sx), (my, sy) = mean_se(xs), mean_se(ys)
    se = math.sqrt(sx**2 + sy**2)
    return mx - my, mx - my - 1.96 * se, mx - my + 1.96 * se


def ratio(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """mean(xs) / mean(ys) and a 95% interval by the delta method: the ratio's relative standard error is
    sqrt((se_x / mean_x)^2 + (se_y / mean_y)^2) for independent samples, the interval the ratio +- 1.96 of
    its standard error (normal quantile, as `difference`). A speed ratio of two frameworks' runs, read as
    such: with two runs a side the standard errors are themselves rough, so judge a goal on four or more."""
    (mx, sx), (my, sy) = mean_se(xs), mean_se(ys)
    r = mx / my
    se = r * math.sqrt((sx / mx) ** 2 + (sy / my) ** 2)
    return r, r - 1.96 * se, r + 1.96 * se


class MatmulCount:
    """A context that counts the arithmetic of the matrix products run inside it (torch's FLOP counter,
    `torch.utils.flop_counter.FlopCounterMode`; CPU attention kernels are not counted), or does nothing
    when not `enabled`. `gflop` after the block: billions of floating-point operations, None when off.
    Counting slows every operation down, so a counted run is never a timed one."""

    def __init__(self, enabled: bool):
        self.enabled, self.gflop, self.mode = enabled, None, None

    def __enter__(self):
        if self.enabled:
            from torch.utils.flop_counter import FlopCounterMode

            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
            self.gflop = self.mode.get_total_flops() / 1e9
        return False


class Recorder:
    """Stands in for our stages' tracker: keeps every logged step in memory."""

    def __init__(self):
        self.rows = []

    def log(self, stats, step):
        self.rows.append({"step": step, **{k: float(v) for k, v in stats.items()}})

    def summary(self, metrics):
        pass

    def close(self):
        pass


def write_result(path: str | None, result: dict) -> None:
    """One JSON object per run, read back by bench/run.py, with the process's minor page faults and system
    time so far (the kernel's share of the run: zero-filled pages, on first touch and each time the allocator
    gave a page back and asks for it again)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    text = json.dumps({**result, "minor_faults": usage.ru_minflt, "system_s": usage.ru_stime}, indent=1)
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
    add_lora_args(p, "the policy's: the value model trains every weight on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--count-flops", action="store_true",
                   help="count the training loop's matrix arithmetic (slower: not a timed run)")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The linear layers LoRA adapts on both sides (configs/smol.yaml's)."""


def add_lora_args(p, whose: str) -> None:
    """--lora-r and --lora-alpha: LoRA on every linear layer of the blocks (`whose`: which model gets it)."""
    p.add_argument("--lora-r", type=int, default=0,
                   help=f"LoRA rank on every linear layer of the blocks, {whose} (0: train every weight)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")


def lora_block(a) -> dict:
    """Our stage's `lora` for --lora-r/--lora-alpha ({} without LoRA): the layers of LORA_TARGETS, dropout 0."""
    if not a.lora_r:
        return {}
    return {"lora": {"enabled": True, "r": a.lora_r, "alpha": a.lora_alpha, "dropout": 0.0,
                     "target_modules": LORA_TARGETS}}


def peft_config(a):
    """TRL's `peft_config` for --lora-r/--lora-alpha (None without LoRA): the layers, rank, alpha and dropout of
    our stage's `lora` (`lora_block`). With it TRL's reference is the policy with its adapters disabled, as ours."""
    if not a.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def add_grpo_args(p) -> None:
    """The GRPO settings both implementations receive, under one name each (bench/grpo_ours.py maps them
    to our stage's config, bench/grpo_trl.py to TRL's GRPOConfig)."""
    p.add_argument("--policy", required=True, help="SFT policy directory (also the reference)")
    p.add_argument("--prompts", required=True, help='training prompts (.jsonl.gz of {"prompt", "word"} rows)')
    p.add_argument("--out", required=True, help="directory for the final policy")
    p.add_argument("--json", help="where to write the result")
    p.add_argument("--reward", default="uses_word",
                   help="the reward function: a judge's name (rlhf/judges.py, or registered: tasks/words.py), "
                        "given the prompt rows' columns")
    p.add_argument("--steps", type=int, default=60, help="rollouts (each: sample, score, then the updates)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass over a rollout")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout")
    p.add_argument("--response-length", type=int, default=32, help="max new tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (constant)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 to the reference, in the loss)")
    p.add_argument("--clip", type=float, default=0.2, help="ratio clip (both sides)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--loss", default="sequence_mean", choices=["sequence_mean", "sequence_sum", "token_mean"],
                   help="loss aggregation (our names; bench/grpo_trl.py maps them to TRL's loss_type)")
    p.add_argument("--estimator", default="grpo", choices=["grpo", "dr_grpo"],
                   help="grpo: (r - group mean) / group std; dr_grpo: r - group mean")
    add_lora_args(p, "the policy's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--count-flops", action="store_true",
                   help="count the training loop's matrix arithmetic (slower: not a timed run)")
