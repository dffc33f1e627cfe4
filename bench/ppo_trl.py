"""TRL 1.12.0's PPOTrainer (`trl.experimental.ppo`, the last release that shipped it) on the same SFT and
reward-model directories and hyperparameters as bench/ppo_ours.py. Runs in the bench virtualenv.

Settings TRL defaults differently from us and that are set here to match our stage: fp32 (TRL: bf16),
no gradient checkpointing (TRL: on), a constant learning rate (TRL: linear decay), AdamW eps 1e-5,
value-loss weight 0.5 (TRL: 0.1), all rollout forwards in one batch, no sample generations. With --lora-r,
TRL's `peft_config` on the policy's seven linear layers (our stage's `lora`): the reference is the policy with
its adapters off on both sides, and the value model trains every weight on both. TRL has one learning rate for
policy and value, so ours gets --lr for both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulCount, add_ppo_args, peak_rss_mib, peft_config, read_prompts, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_ppo_args(p)
    a = p.parse_args()
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback, set_seed)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, "pad and EOS must differ"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in read_prompts(a.prompts)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    train = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(a.policy)
    # with LoRA (--lora-r) TRL wraps the policy itself and its reference is the policy with adapters off, as ours
    ref = None if a.lora_r else AutoModelForCausalLM.from_pretrained(a.policy)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1)
    # TRL's rollout batch is per_device_train_batch_size * gradient_accumulation_steps, split into
    # num_mini_batches; its micro-batches are per_device_train_batch_size rows and Accelerate steps the
    # optimizer every gradient_accumulation_steps micro-batches, counted across minibatches. Only with
    # accumulation 1 does that give one optimizer step per minibatch, as in our stage.
    if a.grad_accum != 1:
        sys.exit("ppo_trl.py: TRL's PPO steps once per minibatch only with --grad-accum 1")
    if a.batch % a.minibatches:
        sys.exit("ppo_trl.py: --batch must divide into --minibatches")
    cfg = PPOConfig(
        output_dir=str(Path(a.out) / "trainer"),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=a.minibatches,
        local_rollout_forward_batch_size=a.batch,
        total_episodes=a.steps * a.batch,
        num_ppo_epochs=a.epochs,
        response_length=a.response_length,
        temperature=a.temperature,
        kl_coef=a.kl_coef,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.5,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        missing_eos_penalty=None,
        stop_token="eos",
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        adam_epsilon=1e-5,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=a.seed,
        dataloader_pin_memory=False,
    )
    rows = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                rows.append(dict(logs))

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train.select(range(a.batch)),
                         callbacks=[Keep()], peft_config=peft_config(a))
    t0 = time.perf_counter()
    with MatmulCount(a.count_flops) as counted:
        trainer.train()
    train_s = time.perf_counter() - t0
    out = Path(a.out) / "policy"
    policy = trainer.policy_model
    (policy.merge_and_unload() if a.lora_r else policy).save_pretrained(str(out))  # a plain policy, as ours saves
    tok.save_pretrained(str(out))
    steps = len([r for r in rows if "objective/scores" in r])
    write_result(a.json, {
        "framework": "trl", "steps": steps, "episodes": steps * a.batch, "train_s": train_s,
        "episodes_per_s": steps * a.batch / train_s, "peak_rss_mib": peak_rss_mib(),
        "train_score_first": rows[0].get("objective/scores") if rows else None,
        "train_score_last": rows[-1].get("objective/scores") if rows else None,
        "train_kl_last": rows[-1].get("objective/kl") if rows else None, "policy_dir": str(out),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or a.threads, "gflop": counted.gflop,
    })


if __name__ == "__main__":
    main()
