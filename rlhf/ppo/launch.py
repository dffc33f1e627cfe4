"""What PPO needs to run under `accelerate launch` (DDP, DeepSpeed ZeRO-2/3, FSDP) and to be timed.

`LaunchMixin` holds the PPO stage's launch plumbing: wrapping and placing the four models, sharding the
rollout batch over ranks, statistics over all ranks, gathering sharded weights. With one process every
method falls through to the plain single-process behaviour, so `stages/ppo.py` reads as the algorithm.
"""

from __future__ import annotations

import contextlib
import time

import torch

from rlhf.ppo.core import masked_whiten
from rlhf.ppo.rollout import PerTokenHead
from rlhf.errors import StageError


class StepCounter:
    """Step counter saved with the accelerator state (the data position follows from it)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class PhaseTimer:
    """Wall time per phase of a PPO step, summed until `pop()` (the `time/*` stats of every step).

    On GPU the clock waits for queued kernels first, otherwise a phase would be charged to the next one.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """{"time/<phase>": seconds} since the last pop, and a fresh start."""
        out, self.seconds = {f"time/{k}": v for k, v in self.seconds.items()}, {}
        return out


class LaunchMixin:
    """Launch-aware pieces of the PPO stage; expects `self.accelerator`, `self.config`, `self.policy`,
    `self.value_model`, `self.optimizer` and `self.engine` (set by `prepare_models`)."""

    def check_process_split(self, num_processes: int) -> None:
        """Every rank rolls out and updates on an equal share of each batch, minibatch and micro-batch."""
        c = self.config
        per_rank = c.num_minibatches * c.gradient_accumulation_steps * num_processes
        if c.rollout_batch_size % per_rank:
            raise StageError(
                f"ppo: stages.ppo.rollout_batch_size={c.rollout_batch_size} must divide evenly into num_minibatches "
                f"({c.num_minibatches}) x gradient_accumulation_steps ({c.gradient_accumulation_steps}) x "
                f"{num_processes} processes; change the batch size or the launch config's num_processes"
            )

    def prepare_models(self, policy, reference, value, reward) -> None:
        """Wrap the trained models for the launch and place the frozen ones (see rlhf.distributed).

        One process: policy and value as they are. DDP/FSDP: the value model behind `PerTokenHead`, so
        its per-token forward runs through the wrapper that synchronises gradients. DeepSpeed: policy and
        value in one engine (`PolicyAndValue`); under ZeRO-3 reference and reward are sharded too.
        """
        from rlhf.distributed import PolicyAndValue, prepare_frozen, uses_deepspeed, zero_stage

        acc, c = self.accelerator, self.config
        self.engine = None
        if uses_deepspeed():
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = c.micro_batch_size // acc.num_processes
            ds["gradient_clipping"] = c.max_grad_norm  # DeepSpeed clips inside its step
            self.engine, self.optimizer = acc.prepare(PolicyAndValue(policy, PerTokenHead(value)), self.optimizer)
            self.policy, self.value_model = self.engine.module.policy, self.engine.module.value
        elif acc.num_processes > 1:
            self.policy, self.value_model, self.optimizer = acc.prepare(policy, PerTokenHead(value), self.optimizer)
        else:
            self.policy, self.value_model, self.optimizer = acc.prepare(policy, value, self.optimizer)
        if acc.num_processes > 1 or zero_stage(acc) or acc.mixed_precision == "bf16":
            self.reference = prepare_frozen(acc, reference) if reference is not None else None
            self.reward_model = prepare_frozen(acc, reward)
        else:
            device = acc.device
            self.reference = reference.to(device) if reference is not None else None
            self.reward_model = reward.to(device)

    @contextlib.contextmanager
    def generation_model(self):
        """The policy as `generate` needs it: unwrapped, with ZeRO-3's shards gathered for the duration."""
        from rlhf.distributed import zero_stage

        if self.engine is not None and zero_stage(self.accelerator) == 3:
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            # Only the policy's shards are gathered (the value model does not generate). TRL's
            # unwrap_model_for_generation would gather both, and it needs a transformers model, not PolicyAndValue.
            policy = self.engine.module.policy
            with deepspeed.zero.GatheredParameters(list(policy.parameters())):
                remove_hooks(self.engine)  # the gathered weights stay put for all of `generate`
                try:
                    yield policy
                finally:
                    add_hooks(self.engine)
        else:
            yield self.accelerator.unwrap_model(self.policy)

    def gathered_policy_state(self) -> dict | None:
        """The policy's whole state dict where ranks hold shards (ZeRO-3, FSDP), else None.

        A collective: every rank must call it (the save itself runs on the main process only).
        """
        from rlhf.distributed import is_fsdp, zero_stage

        acc = self.accelerator
        if self.engine is not None and zero_stage(acc) == 3:
            full = acc.get_state_dict(self.engine) or {}  # DeepSpeed returns None off the main process
            return {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
        if is_fsdp(acc):
            return acc.get_state_dict(self.policy)  # empty off the main process
        return None

    def local_prompts(self, step: int) -> list[str]:
        """This rank's share of `prompts_for_step(step)`: with N processes rank r rolls out rows
        r*B/N .. (r+1)*B/N - 1, so the batch over all ranks is still `rollout_batch_size`."""
        prompts = self.prompts_for_step(step)
        n, r = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = len(prompts) // n
        return prompts[r * per_rank : (r + 1) * per_rank]

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`masked_whiten` with the statistics of the whole rollout batch (all ranks' rows)."""
        if self.accelerator.num_processes == 1:
            return masked_whiten(x, mask, shift_mean=shift_mean)
        from rlhf.distributed import global_masked_whiten

        return global_masked_whiten(self.accelerator, x, mask, shift_mean=shift_mean)

    def batch_mean(self, x: torch.Tensor) -> float:
        """Mean of a per-sequence quantity (B,) over the whole rollout batch (all ranks' rows)."""
        if self.accelerator.num_processes == 1:
            return x.mean().item()
        return self.accelerator.gather(x).mean().item()

    def batch_unique_share(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> float:
        """Share of distinct responses (B, R) in the whole rollout batch (all ranks' rows)."""
        rows = [tuple(ids[mask].tolist()) for ids, mask in zip(response_ids, response_mask)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        return len(set(rows)) / max(len(rows), 1)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (every rank holds an equal share of the batch)."""
        if self.accelerator.num_processes == 1:
            return stats
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
        values = torch.tensor([float(stats[k]) for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return {**stats, **dict(zip(keys, values.tolist()))}

    def minibatch_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """The True entries of this rank's rows of a minibatch's `mask`, at least 1; over several ranks
        every rank's count divided by the ranks, since the wrappers average gradients over ranks."""
        tokens = mask.sum()
        if self.accelerator.num_processes > 1:
            return self.accelerator.reduce(tokens, reduction="sum").clamp(min=1) / self.accelerator.num_processes
        return tokens.clamp(min=1)

    def micro_batch_loss(self, mb, advantages, returns) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`self.loss` of one micro-batch; under DeepSpeed run through the engine's forward (see
        `rlhf.distributed.PolicyAndValue.forward`), which gradient accumulation depends on."""
        if self.engine is not None:
            return self.engine(self.loss, mb, advantages, returns)
        return self.loss(mb, advantages, returns)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backward of one micro-batch. DeepSpeed steps inside backward at the last micro-batch and
        divides by its accumulation count, which our token weights already account for."""
        if self.engine is not None:
            self.accelerator.gradient_state._set_sync_gradients(last_micro_batch)
            loss = loss * self.config.gradient_accumulation_steps
        self.accelerator.backward(loss)

    def generate_extra(self) -> dict:
        """Extra `generate` arguments for the launch: FSDP shards need every rank to run every decode step."""
        from rlhf.distributed import is_fsdp

        return {"synced_gpus": True} if is_fsdp(self.accelerator) else {}

    def restore_policy(self, state: dict) -> None:
        """Load a whole policy state dict on every rank (ZeRO-3: into the gathered parameters)."""
        from rlhf.distributed import is_fsdp, zero_stage

        policy = self.accelerator.unwrap_model(self.policy)
        if self.engine is not None and zero_stage(self.accelerator) == 3:
            import deepspeed

            # the gathered state is whole on the main process only; rank 0's modification is broadcast
            with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=0):
                if self.accelerator.is_main_process:
                    policy.load_state_dict(state)
        elif is_fsdp(self.accelerator):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # the gathered state is whole on the main process only; it is broadcast from there
            set_model_state_dict(self.policy, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            policy.load_state_dict(state)
