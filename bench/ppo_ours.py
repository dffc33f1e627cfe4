"""Our PPO stage on given SFT and reward-model directories; prints and writes one JSON result.

Only the training loop is timed (the stage's held-out evaluation is the same work for every
framework and is done afterwards by bench/eval_policy.py). Runs in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulCount, Recorder, add_ppo_args, lora_block, peak_rss_mib, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_ppo_args(p)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. stages.ppo.lora.enabled=true")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    import yaml
    from transformers import set_seed

    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ppo = {
        "policy": str(Path(a.policy).resolve()), "rewards": {str(Path(a.reward).resolve()): 1.0},
        "prompts": a.prompts,
        "num_steps": a.steps, "rollout_batch_size": a.batch, "num_minibatches": a.minibatches,
        "gradient_accumulation_steps": a.grad_accum, "ppo_epochs": a.epochs, "max_new_tokens": a.response_length,
        "kl_coef": a.kl_coef, "temperature": a.temperature, "learning_rate": a.lr, "value_learning_rate": a.lr,
        # TRL reads the raw reward-model score and has no normalisation; penalties off on both sides
        "normalize_score": False, "no_eos_score": None,
        # where TRL 1.12.0 puts the score (our default too; explicit, so the comparison stays like for like)
        "score_after_eos": True,
        # TRL 1.12.0's PPO loop never clips gradients (its max_grad_norm is unused), so neither do we here
        "max_grad_norm": 0,
        # the benchmark measures training, not the watchdogs' judgement
        "kl_budget": 1e9, "min_response_length": 0.0, "min_unique_share": None,
        "eval_every": 0, "save_every": 0,
        **lora_block(a),  # the policy's adapters; the value model trains every weight, as TRL's
    }
    exp = {"name": "bench-ppo", "seed": a.seed, "store": str(out / "store"),
           "tracking": {"wandb": "disabled", "dir": str(out / "runs")},
           "evaluation": {"prompts": a.prompts, "num_prompts": 1}, "stages": {"ppo": ppo}}
    cfg_path = out / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(exp, sort_keys=False))
    stage = Pipeline(load_experiment(cfg_path, a.set)).stages["ppo"]
    set_seed(a.seed)
    stage.work_dir = stage.store.work_dir(stage.key)
    stage.tracker = Recorder()
    t0 = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t0
    stage.judge_policy = lambda greedy: {}  # the baseline evaluation is not training time
    t0 = time.perf_counter()
    with MatmulCount(a.count_flops) as counted:
        stage.train()
    train_s = time.perf_counter() - t0
    stage.save(out / "policy")
    rows = stage.tracker.rows
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    write_result(a.json, {
        "framework": "ours", "steps": len(rows), "episodes": len(rows) * a.batch, "train_s": train_s,
        "setup_s": setup_s, "episodes_per_s": len(rows) * a.batch / train_s, "peak_rss_mib": peak_rss_mib(),
        "time": {k: sum(r[k] for r in rows) for k in phases},
        "train_score_first": rows[0]["env/raw_score"], "train_score_last": rows[-1]["env/raw_score"],
        "train_kl_last": rows[-1]["env/kl"], "policy_dir": str(out / "policy"),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or a.threads, "gflop": counted.gflop,
    })


if __name__ == "__main__":
    main()
