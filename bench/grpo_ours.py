"""Our GRPO stage (stages/grpo.py, run through the pipeline's config loading) on a given SFT policy and
prompts file, rewarded by a judge function (`--reward`, by default the task's check `uses_word` of
tasks/words.py, which reads the prompts' "word" column); prints and writes one JSON result.

Only the training loop is timed (`train()`, without the stage's baseline evaluation, which is the same work
for every framework and is done afterwards by bench/eval_task.py). The loop logs where each step's time
goes (time/rollout, time/policy_forward, time/reference_forward, time/score, time/update, time/step); the
result sums them over the steps. Runs in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MatmulCount, Recorder, add_grpo_args, lora_block, peak_gpu_mib,  # noqa: E402
                    peak_rss_mib, write_result)

def stage_config(a) -> dict:
    """stages.grpo of the benchmark's experiment, from the shared settings `a` (bench/common.py)."""
    return {
        "policy": str(Path(a.policy).resolve()), "rewards": {a.reward: 1.0}, "prompts": a.prompts,
        "estimator": a.estimator, "samples_per_prompt": a.group_size, "loss_aggregation": a.loss,
        "num_steps": a.steps, "rollout_batch_size": a.prompts_per_step * a.group_size,
        "num_minibatches": a.minibatches, "gradient_accumulation_steps": a.grad_accum, "ppo_epochs": a.epochs,
        "max_new_tokens": a.response_length, "temperature": a.temperature, "top_p": 1.0,
        "learning_rate": a.lr, "clip_range": a.clip, "max_grad_norm": a.max_grad_norm,
        # TRL's GRPO puts the KL (k3) in the loss and has nothing in the reward
        "kl_penalty": "loss", "kl_coef": a.beta, "adaptive_kl": False,
        # TRL neither whitens advantages over the batch nor scores responses without EOS differently
        "whiten_advantages": False, "no_eos_score": None,
        # the benchmark measures training, not the watchdogs' judgement
        "kl_budget": 1e9, "min_response_length": 0.0, "min_unique_share": None,
        "eval_every": 0, "save_every": 0,
        **lora_block(a),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_grpo_args(p)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides, e.g. stages.grpo.pack_sequences=false")
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
    exp = {"name": "bench-grpo", "seed": a.seed, "store": str(out / "store"),
           "tracking": {"wandb": "disabled", "dir": str(out / "runs")},
           "evaluation": {"prompts": a.prompts, "num_prompts": 1}, "stages": {"grpo": stage_config(a)}}
    cfg_path = out / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(exp, sort_keys=False))
    stage = Pipeline(load_experiment(cfg_path, a.set)).stages["grpo"]
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
    completions = len(rows) * a.prompts_per_step * a.group_size
    write_result(a.json, {
        "framework": "ours", "steps": len(rows), "completions": completions, "train_s": train_s,
        "setup_s": setup_s, "completions_per_s": completions / train_s, "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": peak_gpu_mib(),
        "time": {k: sum(r[k] for r in rows) for k in sorted({k for r in rows for k in r if k.startswith("time/")})},
        "train_reward_first": rows[0][f"env/reward/{a.reward}"],
        "train_reward_last": rows[-1][f"env/reward/{a.reward}"],
        "train_kl_per_sequence_last": rows[-1]["env/kl"], "train_length_last": rows[-1]["env/response_length"],
        "train_rewards": [r[f"env/reward/{a.reward}"] for r in rows],
        "generated_tokens": sum(r["env/response_length"] for r in rows) * a.prompts_per_step * a.group_size,
        "mismatch": {k: sum(r[k] for r in rows) / len(rows) for k in sorted({k for r in rows for k in r
                                                                             if k.startswith("rollout/")})},
        "policy_dir": str(out / "policy"), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or a.threads,
        "gflop": counted.gflop,
    })


if __name__ == "__main__":
    main()
