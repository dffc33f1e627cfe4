"""TRL's `GRPOTrainer` (TRL 1.16, a dependency of the project) on the same SFT policy, prompts, reward
function and settings as bench/grpo_ours.py; prints and writes the same JSON fields. Runs in the
project's virtualenv (it loads the reward function with rlhf/judges.py's load_judge).

Setting by setting (ours: stages.grpo, built by bench/grpo_ours.py; TRL: GRPOConfig, `trl_config` below):

| setting (bench/common.py) | ours | TRL |
|---|---|---|
| SFT policy | `policy` (also the reference) | `model` (loaded here), reference built from its path |
| prompts, chat template | `prompts`, our tokenizer's chat template | conversational `prompt` column, the same tokenizer as `processing_class` |
| --reward (uses_word) | `rewards: {uses_word: 1.0}` | `reward_funcs=[reward_function("uses_word")]`: the same function in TRL's signature |
| --group-size K | `samples_per_prompt` | `num_generations` |
| --prompts-per-step P | `rollout_batch_size` = P x K | `generation_batch_size` = P x K |
| --minibatches M, --grad-accum g | `num_minibatches`, `gradient_accumulation_steps` | `per_device_train_batch_size` = P K / (M g), `gradient_accumulation_steps` = g, `steps_per_generation` = M g |
| --epochs E | `ppo_epochs` | `num_iterations` |
| --steps S | `num_steps` | `max_steps` = S M E (TRL counts optimizer steps) |
| --lr | `learning_rate` | `learning_rate`, `lr_scheduler_type="constant"`, no warmup |
| --beta | `kl_penalty: loss`, `kl_coef` (k3) | `beta` (k3 in the loss) |
| --clip | `clip_range` | `epsilon` (and `epsilon_high` by default the same) |
| --max-grad-norm | `max_grad_norm` | `max_grad_norm` |
| --response-length | `max_new_tokens` | `max_completion_length` |
| --temperature | `temperature`, `top_p: 1.0`, top-k off | `temperature`, `top_p=1.0`, `top_k=0`, `min_p=None`, `repetition_penalty=1.0` |
| --estimator grpo / dr_grpo | `estimator` | `scale_rewards="group"` / `"none"` |
| --loss sequence_mean | `loss_aggregation` | `loss_type="grpo"` |
| --loss sequence_sum | | `loss_type="dr_grpo"` (divides by `max_completion_length`, as ours) |
| --loss token_mean | | `loss_type="bnpo"` when g = 1 (a micro-batch is the minibatch), `"dapo"` when M = 1 (its denominator is the rollout's tokens / M, which is the minibatch's only then); other splits have no exact TRL match |
| advantages | `whiten_advantages: false` | not whitened (TRL never does) |
| responses without EOS | `no_eos_score: null` (scored as they are) | `mask_truncated_completions=False` |
| precision, checkpointing | fp32 | `bf16=False`, `activation_checkpointing=False` |
| dropout | off in every model | `disable_dropout=True` |
| --lora-r, --lora-alpha | `lora` on the seven linear layers of each block, dropout 0; the reference is the policy with adapters off | `peft_config=LoraConfig(...)` on the same layers; TRL's reference is then the same |
| optimizer | torch AdamW (fused), eps 1e-5, weight decay 0.01 | Trainer's fused AdamW, `adam_epsilon=1e-5`, `weight_decay=0.01` |
| device | the GPU when there is one | `use_cpu` only when there is no GPU |
| generation | `model.generate` (transformers), KV cache | the same (`use_vllm=False`, no continuous batching) |

Differences the mapping cannot remove: TRL's group std has eps 1e-4 (ours 1e-6); its k3 is not clamped
(ours clamps log r to +-20 and the estimate to [0, 10]); the Trainer exempts biases and norm weights from
weight decay (ours decays every parameter); TRL draws its prompts with its own sampler and walks the
rollout's shuffled minibatches in the same order in every epoch (ours reshuffles per epoch). With M = E = 1
TRL skips the no-grad policy forward (the logprobs of the update's own forward stand in for it), which ours
always runs; ours copies the policy to CPU every step for its watchdogs, which TRL does not have.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulCount, add_grpo_args, peak_gpu_mib, peak_rss_mib, peft_config, read_rows, write_result  # noqa: E402

SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}
"""Our estimator -> TRL's scale_rewards (both subtract the group's mean)."""


def trl_loss_type(loss: str, minibatches: int, grad_accum: int) -> str:
    """TRL's loss_type that aggregates token losses as our `loss_aggregation` does, or ValueError."""
    if loss == "sequence_mean":
        return "grpo"
    if loss == "sequence_sum":
        return "dr_grpo"
    if loss == "token_mean":
        # bnpo: each micro-batch's own token mean / g; dapo: the rollout's tokens / M as every step's denominator
        if grad_accum == 1:
            return "bnpo"
        if minibatches == 1:
            return "dapo"
        raise ValueError("--loss token_mean has no exact TRL match with both --minibatches and --grad-accum above 1")
    raise ValueError(f"--loss {loss}: no TRL loss_type for it")


def trl_config(a) -> dict:
    """GRPOConfig's arguments for the shared settings `a` (bench/common.py), as in the module docstring."""
    responses = a.prompts_per_step * a.group_size
    if responses % (a.minibatches * a.grad_accum):
        raise ValueError(f"{responses} responses per step do not split into {a.minibatches} minibatches of "
                         f"{a.grad_accum} micro-batches")
    return {
        "per_device_train_batch_size": responses // (a.minibatches * a.grad_accum),
        "gradient_accumulation_steps": a.grad_accum,
        "steps_per_generation": a.minibatches * a.grad_accum,
        "num_generations": a.group_size,
        "num_iterations": a.epochs,
        "max_steps": a.steps * a.minibatches * a.epochs,
        "max_completion_length": a.response_length,
        "temperature": a.temperature, "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
        "learning_rate": a.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "beta": a.beta, "epsilon": a.clip, "max_grad_norm": a.max_grad_norm,
        "loss_type": trl_loss_type(a.loss, a.minibatches, a.grad_accum),
        "scale_rewards": SCALE_REWARDS[a.estimator],
        "mask_truncated_completions": False,
        "adam_epsilon": 1e-5, "weight_decay": 0.01,
        "bf16": False, "fp16": False, "activation_checkpointing": False, "disable_dropout": True,
        "use_vllm": False, "seed": a.seed, "data_seed": a.seed,
    }


def reward_function(name: str, columns: list[str]):
    """The judge `name` (rlhf.judges.load_judge) in TRL's reward-function signature, under its own name (TRL logs
    rewards/<name>/mean). TRL passes conversational prompts and completions as lists of messages, and the
    dataset's columns with its own extras (trainer_state, log_metric, ...) as keyword arguments; the judge
    gets the texts and the dataset `columns`, as our stage gives them."""
    from rlhf.judges import load_judge

    judge = load_judge(name, "--reward")

    def reward(prompts, completions, **kwargs):
        return judge([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions],
                     **{k: kwargs[k] for k in columns})

    reward.__name__ = name
    return reward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grpo_args(p)
    a = p.parse_args()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.policy)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, "pad and EOS must differ"
    rows = read_rows(a.prompts)
    columns = [k for k in rows[0] if k != "prompt"]  # what the reward function may read ("word")
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                               **{k: [r[k] for r in rows] for k in columns}})
    policy = AutoModelForCausalLM.from_pretrained(a.policy)
    cfg = GRPOConfig(output_dir=str(Path(a.out) / "trainer"), use_cpu=not torch.cuda.is_available(),
                     save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
                     log_completions=False, dataloader_pin_memory=False, **trl_config(a))
    logged, clock = [], {}  # every log row; the training loop's start and end

    class Keep(TrainerCallback):
        """Keeps every log row, and the time between the first step's start and the last step's end."""

        def on_train_begin(self, args, state, control, **kw):
            clock["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logged.append(dict(logs))

    trainer = GRPOTrainer(model=policy, reward_funcs=[reward_function(a.reward, columns)], args=cfg,
                          train_dataset=train, processing_class=tok, callbacks=[Keep()], peft_config=peft_config(a))
    with MatmulCount(a.count_flops) as counted:
        trainer.train()
    train_s = clock["end"] - clock["start"]
    out = Path(a.out) / "policy"
    model = trainer.model.merge_and_unload() if a.lora_r else trainer.model  # a plain policy, as ours saves
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    rewards = [r[f"rewards/{a.reward}/mean"] for r in logged if r.get(f"rewards/{a.reward}/mean") is not None]
    steps = trainer.state.global_step // (a.minibatches * a.epochs)
    completions = steps * a.prompts_per_step * a.group_size
    kls = [r["kl"] for r in logged if r.get("kl") is not None]
    lengths = [r["completions/mean_length"] for r in logged if r.get("completions/mean_length") is not None]
    write_result(a.json, {
        "framework": "trl", "steps": steps, "completions": completions, "train_s": train_s,
        "completions_per_s": completions / train_s, "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu_mib(),
        "train_reward_first": rewards[0] if rewards else None, "train_reward_last": rewards[-1] if rewards else None,
        "train_kl_per_token_last": kls[-1] if kls else None, "train_length_last": lengths[-1] if lengths else None,
        "train_lengths": lengths,
        "policy_dir": str(out), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or a.threads,
        "gflop": counted.gflop,
    })


if __name__ == "__main__":
    main()
