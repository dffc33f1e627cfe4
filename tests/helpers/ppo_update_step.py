"""One RL update on a fixed rollout batch, run in every process of a launch (tests/test_distributed.py).

    python tests/helpers/ppo_update_step.py CONFIG OUT_DIR [overrides...]
    python tests/helpers/ppo_update_step.py CONFIG OUT_DIR --stage grpo --modes token_mean,sequence_sum [overrides...]

With `--modes`, the update runs once per loss aggregation mode (a fresh stage each time, the same batch)
and the weights after each land in `after-<mode>.pt`.

Every rank builds the same rollout batch of `rollout_batch_size` prompts (same seed, same weights),
keeps its own rows (rank r: rows r*B/N .. (r+1)*B/N - 1, as the training loop's `RLLaunch.local_rows`),
then computes rewards, advantages and the update exactly as `PPOStage.train` does. The main process
writes the batch (`traj.pt`) and the weights after the update (`after.pt`), so a one-process run of
the same update on the whole batch can be compared with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.rollout import PerTokenHead, Trajectory


SGD_LR = 0.1


def build_stage(config: str, overrides: list[str], name: str = "ppo"):
    """The RL stage `name`, set up, with plain SGD and no gradient clipping.

    AdamW divides each step by the gradient's running magnitude and clipping rescales it, so both would
    hide a gradient off by a constant factor (a wrong 1/N across ranks, a wrong accumulation scale).
    With SGD the weights move by exactly lr x gradient, so any such factor shows in the comparison.
    """
    stage = Pipeline(load_experiment(config, [*overrides, f"stages.{name}.max_grad_norm=1e9"])).stages[name]
    stage.build_optimizer = lambda: torch.optim.SGD(
        [p for m in (stage.policy, stage.value_model) if m is not None for p in m.parameters() if p.requires_grad],
        lr=SGD_LR)
    return stage.open(tracking=False)


def fixed_batch(stage) -> Trajectory:
    """The step-0 rollout of the whole batch, with response lengths that differ by row.

    Unequal lengths make the ranks hold different token counts, so a per-rank token mean or per-rank
    whitening would give a different update than the whole batch's.
    """
    torch.manual_seed(0)
    traj = stage.make_trajectory(stage.prompts_for_step(0))
    lengths = torch.arange(traj.response_ids.shape[0]) % traj.response_ids.shape[1] + 1  # (B,)
    mask = torch.arange(traj.response_ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # (B, R)
    return traj._replace(response_mask=mask, episode_mask=stage.episode_mask(mask, traj.has_eos))


def update(stage, traj: Trajectory) -> dict[str, torch.Tensor]:
    """rewards -> advantages -> update on this process's rows; the policy and value weights after it."""
    acc = stage.accelerator
    per_rank = traj.query_ids.shape[0] // acc.num_processes
    rows = slice(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)
    local = traj.rows(torch.arange(rows.start, rows.stop))
    rewards, _ = stage.compute_rewards(local)
    advantages, returns = stage.compute_advantages(rewards, local)
    torch.manual_seed(3)
    stage.update(local, advantages, returns)
    policy = whole_state(acc, acc.unwrap_model(stage.policy))
    out = {f"policy.{k}": v for k, v in policy.items()}
    if stage.value_model is not None:
        value_model = acc.unwrap_model(stage.value_model)
        value = whole_state(acc, value_model.model if isinstance(value_model, PerTokenHead) else value_model)
        out.update({f"value.{k}": v for k, v in value.items()})
    return out


def whole_state(acc, module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s weights; under ZeRO-3 gathered from every rank's shard (a collective)."""
    from rlhf.distributed import zero_stage

    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main(config: str, out: str, *args: str) -> None:
    args, name, modes = list(args), "ppo", [None]
    if "--stage" in args:
        i = args.index("--stage")
        name = args.pop(i + 1)
        args.pop(i)
    if "--modes" in args:
        i = args.index("--modes")
        modes = args.pop(i + 1).split(",")
        args.pop(i)
    traj = None
    for mode in modes:
        overrides = args + ([f"stages.{name}.loss_aggregation={mode}"] if mode else [])
        stage = build_stage(config, overrides, name)
        traj = fixed_batch(stage) if traj is None else traj  # one batch for every mode
        weights = update(stage, traj)
        if stage.accelerator.is_main_process:
            Path(out).mkdir(parents=True, exist_ok=True)
            torch.save(tuple(traj), Path(out) / "traj.pt")
            torch.save(weights, Path(out) / (f"after-{mode}.pt" if mode else "after.pt"))
        stage.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
