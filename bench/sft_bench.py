"""SFT throughput: our SFT stage vs a plain `trl.SFTTrainer` script, same model, data and settings.

`--mode ours` runs `stages.sft.SFTStage` (setup and training, as `make sft` does; evaluation and saving
are left out, the plain script has neither); `--mode plain` is the script a user would write without the
framework. Tokens are the trainer's own count (`num_tokens`), the same for both. Runs in the project's
virtualenv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib, write_result  # noqa: E402


def trainer_args(a, output_dir: str) -> dict:
    """The SFTConfig both modes train with (our stage builds the same from its config)."""
    return dict(output_dir=output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch,
                per_device_eval_batch_size=a.batch, gradient_accumulation_steps=1, learning_rate=a.lr,
                warmup_steps=a.warmup, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                max_length=a.max_length, packing=False, assistant_only_loss=True, bf16=False,
                logging_steps=a.logging_steps, save_steps=a.save_steps, save_total_limit=2, report_to="none",
                seed=a.seed, data_seed=a.seed, dataloader_pin_memory=False)


def run_ours(a) -> tuple[object, float, float]:
    import yaml
    from transformers import set_seed

    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sft = {"model": str(Path(a.model).resolve()), "train_data": a.train, "eval_data": a.train,
           "max_steps": a.steps, "batch_size": a.batch, "learning_rate": a.lr, "warmup_steps": a.warmup,
           "max_length": a.max_length, "logging_steps": a.logging_steps, "save_steps": a.save_steps}
    exp = {"name": "bench-sft", "seed": a.seed, "store": str(out / "store"),
           "tracking": {"wandb": "disabled", "dir": str(out / "runs")}, "stages": {"sft": sft}}
    (out / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    stage = Pipeline(load_experiment(out / "experiment.yaml")).stages["sft"]
    from rlhf.tracking import Tracker

    t0 = time.perf_counter()
    set_seed(a.seed)
    stage.work_dir = stage.store.work_dir(stage.key)
    stage.tracker = Tracker(stage.experiment, "sft", stage.key, enabled=True)
    stage.setup()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage.train()
    train_s = time.perf_counter() - t0
    stage.tracker.close()
    return stage.trainer, setup_s, train_s


def run_plain(a) -> tuple[object, float, float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    ds = load_dataset("json", data_files=a.train, split="train")
    ds = ds.map(lambda r: {"messages": [{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["response"]}]},
                remove_columns=ds.column_names)
    trainer = SFTTrainer(model=model, args=SFTConfig(**trainer_args(a, str(Path(a.out) / "trainer"))),
                         train_dataset=ds, processing_class=tok)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    return trainer, setup_s, train_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["ours", "plain"], required=True)
    p.add_argument("--model", required=True, help="pretrained model directory (the pretrain artifact)")
    p.add_argument("--train", default="data/sft/train.jsonl.gz")
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    trainer, setup_s, train_s = (run_ours if a.mode == "ours" else run_plain)(a)
    logged = [r for r in trainer.state.log_history if "num_tokens" in r]
    tokens = float(logged[-1]["num_tokens"]) if logged else float("nan")
    write_result(a.json, {"framework": a.mode, "steps": trainer.state.global_step, "tokens": tokens,
                          "setup_s": setup_s, "train_s": train_s, "tokens_per_s": tokens / train_s,
                          "final_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r),
                                             None),
                          "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
