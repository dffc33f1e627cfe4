"""DPO and KTO throughput: our stage with the model's own logits (its CPU default, `fused_lm_head: null`) vs
the same stage with TRL's fused LM head (`fused_lm_head: true`), which is what a `trl.DPOTrainer` or
`trl.KTOTrainer` script runs on a CPU: the same model, pairs, settings and trainer otherwise.

Only the training is timed (`trainer.train()` inside the stage's `train()`; the stage's evaluations are left
out: the same work for both heads). Prints and writes one JSON result. Runs in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", choices=["dpo", "kto"], required=True)
    p.add_argument("--head", choices=["own", "trl"], required=True,
                   help="own: the model's own logits (fused_lm_head null on a CPU); trl: TRL's fused LM head")
    p.add_argument("--policy", required=True, help="SFT policy directory (also the reference)")
    p.add_argument("--preferences", required=True, help="a preferences stage's artifact directory")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="pairs (DPO) or unpaired answers (KTO) per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", help="where to write the result")
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import yaml
    from transformers import set_seed

    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline
    from rlhf.trainers import TrainerStage

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    block = {"class": f"stages.{a.method}:{a.method.upper()}Stage", "policy": str(Path(a.policy).resolve()),
             "preferences": str(Path(a.preferences).resolve()), "max_steps": a.steps, "batch_size": a.batch,
             "learning_rate": a.lr, "eval_every": 0, "fused_lm_head": a.head == "trl"}
    exp = {"name": "bench-pairs", "seed": a.seed, "store": str(out / "store"),
           "tracking": {"wandb": "disabled", "dir": str(out / "runs")},
           "evaluation": {"prompts": "data/prompts/eval.jsonl.gz", "num_prompts": 1}, "stages": {a.method: block}}
    (out / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    stage = Pipeline(load_experiment(out / "experiment.yaml")).stages[a.method]
    from rlhf.tracking import Tracker

    t0 = time.perf_counter()
    set_seed(a.seed)
    stage.work_dir = stage.store.work_dir(stage.key)
    stage.tracker = Tracker(stage.experiment, a.method, stage.key, enabled=False)
    stage.setup()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = TrainerStage.train(stage)  # the Trainer's run alone: no evaluation of the reference
    train_s = time.perf_counter() - t0
    losses = [row["loss"] for row in stage.trainer.state.log_history if "loss" in row]
    write_result(a.json, {
        "method": a.method, "head": a.head, "steps": metrics["train_steps"], "train_s": train_s, "setup_s": setup_s,
        "examples_per_s": metrics["train_steps"] * a.batch / train_s, "train_loss": metrics["train_loss"],
        "losses": losses, "peak_rss_mib": peak_rss_mib(), "threads": a.threads,
    })


if __name__ == "__main__":
    main()
