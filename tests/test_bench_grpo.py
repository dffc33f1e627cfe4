"""The GRPO benchmark's mapping of one set of settings onto our stage and onto TRL's GRPOTrainer
(bench/grpo_ours.py, bench/grpo_trl.py): the same work per step on both sides, and TRL loss types that
aggregate token losses as our `loss_aggregation` does (TRL 1.16.0's formulas transcribed below)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import add_grpo_args  # noqa: E402
from grpo_ours import stage_config  # noqa: E402
from grpo_trl import peft_config, trl_config, trl_loss_type  # noqa: E402

from rlhf.ppo.aggregation import aggregate  # noqa: E402
from stages.grpo import GRPOConfig  # noqa: E402


def settings(*args: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_grpo_args(p)
    return p.parse_args(["--policy", "sft", "--prompts", "p.jsonl.gz", "--out", "o", *args])


@pytest.mark.parametrize("split", [("2", "1", "1"), ("1", "2", "1"), ("2", "2", "3"), ("4", "1", "2")])
def test_both_sides_do_the_same_work_per_step(split):
    minibatches, grad_accum, epochs = split
    a = settings("--steps", "5", "--prompts-per-step", "4", "--group-size", "4", "--minibatches", minibatches,
                 "--grad-accum", grad_accum, "--epochs", epochs, "--loss", "sequence_sum", "--estimator", "dr_grpo")
    ours, trl = stage_config(a), trl_config(a)
    GRPOConfig(**ours)  # our stage accepts it (its own checks of the split)
    # TRL's generation batch (one process) is our rollout; it steps once per `gradient_accumulation_steps`
    # micro-batches of `per_device_train_batch_size`, which makes our minibatches
    assert trl["per_device_train_batch_size"] * trl["steps_per_generation"] == ours["rollout_batch_size"] == 16
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == 16 // ours["num_minibatches"]
    assert trl["max_steps"] == ours["num_steps"] * ours["num_minibatches"] * ours["ppo_epochs"]
    assert (trl["num_generations"], trl["num_iterations"], trl["gradient_accumulation_steps"]) == (
        ours["samples_per_prompt"], ours["ppo_epochs"], ours["gradient_accumulation_steps"])
    assert (trl["beta"], trl["epsilon"], trl["max_grad_norm"], trl["learning_rate"], trl["max_completion_length"]) == (
        ours["kl_coef"], ours["clip_range"], ours["max_grad_norm"], ours["learning_rate"], ours["max_new_tokens"])
    assert ours["kl_penalty"] == "loss" and not ours["whiten_advantages"] and ours["no_eos_score"] is None
    assert (trl["loss_type"], trl["scale_rewards"]) == ("dr_grpo", "none")


def test_lora_is_the_same_on_both_sides_and_absent_unless_asked():
    from rlhf.models import LoraSettings

    assert "lora" not in stage_config(settings()) and peft_config(settings()) is None
    a = settings("--lora-r", "16", "--lora-alpha", "32")
    ours, trl = LoraSettings(**stage_config(a)["lora"]), peft_config(a)
    assert ours.enabled and (ours.r, ours.alpha, ours.dropout) == (trl.r, trl.lora_alpha, trl.lora_dropout) == (16, 32, 0)
    assert set(ours.target_modules) == set(trl.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"}


def test_token_mean_has_a_trl_match_only_for_whole_minibatches_or_one_minibatch():
    assert trl_loss_type("token_mean", minibatches=4, grad_accum=1) == "bnpo"
    assert trl_loss_type("token_mean", minibatches=1, grad_accum=4) == "dapo"
    with pytest.raises(ValueError, match="no exact TRL match"):
        trl_loss_type("token_mean", minibatches=2, grad_accum=2)


def trl_micro_batch_loss(loss_type, per_token_loss, mask, *, grad_accum, steps_per_generation, rollout_tokens,
                         max_completion_length):
    """GRPOTrainer._compute_loss's aggregation in TRL 1.16.0 (training mode, one process)."""
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / grad_accum
    if loss_type == "dapo":  # num_items_in_batch counts the whole generation batch's tokens
        return (per_token_loss * mask).sum() / (rollout_tokens * grad_accum / steps_per_generation)
    raise ValueError(loss_type)


def minibatch_losses(per_token_loss, mask, minibatches, grad_accum, ours=None, trl_type=None):
    """Each minibatch's loss, summed over its micro-batches: ours (`aggregate` in mode `ours` with the
    minibatch's counts) or TRL's (`trl_type`)."""
    rows, length = per_token_loss.shape
    out = []
    for mb in torch.arange(rows).split(rows // minibatches):
        total = 0.0
        for micro in mb.split(len(mb) // grad_accum):
            loss, m = per_token_loss[micro], mask[micro]
            if ours is not None:
                total += aggregate(loss, m, ours, num_sequences=len(mb), num_tokens=mask[mb].sum(), max_len=length)
            else:
                total += trl_micro_batch_loss(trl_type, loss, m.float(), grad_accum=grad_accum,
                                              steps_per_generation=minibatches * grad_accum,
                                              rollout_tokens=mask.sum(), max_completion_length=length)
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("loss,minibatches,grad_accum", [
    ("sequence_mean", 2, 1), ("sequence_mean", 2, 2), ("sequence_sum", 2, 2), ("sequence_sum", 1, 4),
    ("token_mean", 4, 1), ("token_mean", 1, 4)])
def test_trl_loss_type_aggregates_as_ours(loss, minibatches, grad_accum):
    torch.manual_seed(0)
    per_token_loss = torch.randn(8, 6)  # (B, T)
    lengths = torch.tensor([1, 6, 3, 2, 6, 5, 4, 1])
    mask = torch.arange(6) < lengths[:, None]  # (B, T) True = a real response token
    ours = minibatch_losses(per_token_loss, mask, minibatches, grad_accum, ours=loss)
    theirs = minibatch_losses(per_token_loss, mask, minibatches, grad_accum,
                              trl_type=trl_loss_type(loss, minibatches, grad_accum))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_dapo_is_not_our_token_mean_with_several_minibatches():
    # dapo divides every minibatch by the rollout's tokens / M: minibatch 1 here has 1+6+3+2 = 12 of the
    # rollout's 12+16 = 28 tokens, so its loss is scaled by 12 / 14 against a token mean over its own tokens
    per_token_loss = torch.ones(8, 6)
    mask = torch.arange(6) < torch.tensor([1, 6, 3, 2, 6, 5, 4, 1])[:, None]
    ours = minibatch_losses(per_token_loss, mask, 2, 1, ours="token_mean")
    dapo = minibatch_losses(per_token_loss, mask, 2, 1, trl_type="dapo")
    assert torch.allclose(ours, torch.tensor([1.0, 1.0]))
    assert torch.allclose(dapo, torch.tensor([12 / 14, 16 / 14]))
