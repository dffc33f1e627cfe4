"""DAPO: GRPO with clip-higher, token-level loss, no KL, and dynamic sampling (Yu et al. 2025, arXiv 2503.14476).

The RL loop of `stages/ppo.py` with DAPO's defaults, and one step of its own: a group whose K responses all
got the same reward has a group-relative advantage of 0 on every token and trains nothing, so the batch
keeps only groups whose rewards differ and samples more prompts until it is full ("dynamic sampling", at
most `max_sampling_rounds` rollouts a step; then tied groups fill the rest, with no gradient, as the
paper's cap on generation batches does). The other three ideas are settings every RL stage has:
`clip_range_high` (clip-higher), `loss_aggregation: token_mean` (token-level policy gradient) and
`kl_coef: 0`. DAPO's overlong reward shaping is not built in: a reward function can add it.

    stages:
      dapo:
        policy: sft
        rewards: {uses_word: 1.0}       # a checkable reward: DAPO's setting, where groups often tie
        samples_per_prompt: 8
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.errors import StageError
from rlhf.ppo.aggregation import AGGREGATIONS
from rlhf.ppo.sampling_filters import groups_with_signal
from rlhf.prompts import step_rows
from rlhf.rollout import Trajectory, cat_trajectories
from rlhf.schema import checked
from stages.grpo import GRPOConfig, GRPOStage


@dataclass
class DAPOConfig(GRPOConfig):
    """GRPOConfig with DAPO's defaults, and its dynamic sampling."""

    clip_range_high: float | None = checked(0.28, gt=0)
    loss_aggregation: str = checked("token_mean", choices=tuple(AGGREGATIONS))
    kl_coef: float = checked(0.0, ge=0)
    max_sampling_rounds: int = checked(3, ge=1)
    """Rollouts a step at most (the first included) while filling the batch with groups whose rewards differ."""

    def __post_init__(self) -> None:
        if self.reuse_rollout_forward is None:  # never by default: see below
            self.reuse_rollout_forward = False
        super().__post_init__()
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: {self.samples_per_prompt}; dynamic sampling keeps groups whose "
                             "rewards differ, which needs 2 or more responses per prompt")
        if self.reuse_rollout_forward:
            raise ValueError("reuse_rollout_forward: true; DAPO's batch joins the rows of several rollouts, which no "
                             "one forward covers; set it to false")


class DAPOStage(GRPOStage):
    """GRPO's loop whose batches hold only groups with a reward signal, as far as `max_sampling_rounds` allow."""

    name = "dapo"
    config_class = DAPOConfig
    training_panels = (*GRPOStage.training_panels, ("env/groups_with_signal", "groups with a reward signal"))

    def setup(self) -> None:
        super().setup()
        if self.launch.num_processes > 1:  # each rank would sample a different number of rounds
            raise StageError(f"{self.stage_name}: dynamic sampling runs in one process only; launch without "
                             "several processes")

    def make_trajectory(self, rows, sampled=None, step: int = 0) -> Trajectory:
        """Step 1-2 with dynamic sampling: the rollout's groups with a signal first, then those of more
        rollouts (a seeded draw of prompts per round, so a resumed run draws the same), then tied groups."""
        c, k = self.config, self.config.samples_per_prompt
        parts = [super().make_trajectory(rows, sampled, step)]
        need = len(parts[0].scores) // k
        keep = [groups_with_signal(parts[0].scores, k)]
        while sum(int(m.sum()) for m in keep) < need and len(parts) < c.max_sampling_rounds:
            more = step_rows(step, c.rollout_batch_size, k, len(self.prompts), self.seed + 7919 * len(parts))
            parts.append(super().make_trajectory(more, self.sampler.sample_now([self.prompts[i] for i in more]), step))
            keep.append(groups_with_signal(parts[-1].scores, k))
        self.sampling_stats = {"env/groups_with_signal": keep[0].float().mean().item(),
                               "env/sampling_rounds": len(parts)}
        chosen = [(i, g) for i, m in enumerate(keep) for g in m.nonzero().flatten().tolist()]
        chosen += [(i, g) for i, m in enumerate(keep) for g in (~m).nonzero().flatten().tolist()]
        rows_of = {}  # per rollout, the rows of its groups that make the batch
        for i, g in chosen[:need]:
            rows_of.setdefault(i, []).extend(range(g * k, (g + 1) * k))
        return cat_trajectories([parts[i].rows(torch.tensor(r)) for i, r in sorted(rows_of.items())],
                                self.tokenizer.pad_token_id)
