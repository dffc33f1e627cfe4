"""What an RL stage's own loop needs under `accelerate launch` (DDP, DeepSpeed ZeRO-2/3, FSDP), and timing.

`RLLaunch` is the launch plumbing a stage owns (`stage.launch`): wrapping and placing the models, each
rank's share of the rollout batch, statistics and whitening over all ranks, gradient weights that stay
exact when ranks and micro-batches split a minibatch, gathering sharded weights. With one process every
method falls through to the plain single-process behaviour, so the stage's loop reads as the algorithm.
It reads no stage config: the sizes it needs are passed in.
"""

from __future__ import annotations

import contextlib
import time

import torch

from rlhf.ppo.core import masked_whiten
from rlhf.rollout import PerTokenHead
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


class RLLaunch:
    """The launch-aware pieces of an RL stage's loop, for one `accelerate.Accelerator`.

    micro_batch_size and gradient_accumulation_steps are the global sizes of the stage's update (over
    all processes); DeepSpeed needs them before `prepare`.
    """

    def __init__(self, accelerator, *, micro_batch_size: int, gradient_accumulation_steps: int,
                 max_grad_norm: float):
        self.accelerator = accelerator
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.engine = None
        self.policy = self.value_model = None

    @classmethod
    def start(cls, stage: str, *, micro_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float,
              seed: int, lora: bool = False) -> RLLaunch:
        """The launch of stage `stage` under this process's `accelerate` settings: a new Accelerator (it forms a
        CPU launch's gloo group first and drops an earlier stage's Trainer settings; DeepSpeed, which steps
        inside backward, learns the micro-batches per optimizer step), and rank r > 0 reseeded with
        `seed` + 100003 r, since every rank was seeded alike and would otherwise sample the same numbers.
        LoRA is refused where the parameters are sharded (its merge needs whole weights)."""
        from rlhf.distributed import new_accelerator, refuse_sharded_lora, uses_deepspeed

        refuse_sharded_lora(stage, lora)
        accelerator = (new_accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
                       if uses_deepspeed() else new_accelerator())
        if accelerator.process_index:
            torch.manual_seed(seed + 100003 * accelerator.process_index)
        return cls(accelerator, micro_batch_size=micro_batch_size,
                   gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def check_split(self, stage: str, rollout_batch_size: int, num_minibatches: int, group_size: int = 1) -> None:
        """Every rank rolls out and updates an equal share of each batch, minibatch and micro-batch, and
        holds whole groups of `group_size` responses to one prompt (their statistics need them together)."""
        n = self.num_processes
        per_rank = num_minibatches * self.gradient_accumulation_steps * n
        if rollout_batch_size % per_rank:
            raise StageError(
                f"{stage}: stages.{stage}.rollout_batch_size={rollout_batch_size} must divide evenly into "
                f"num_minibatches ({num_minibatches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) x {n} processes; change the batch size or the launch "
                "config's num_processes"
            )
        if (rollout_batch_size // n) % group_size:
            raise StageError(
                f"{stage}: each of {n} processes holds {rollout_batch_size // n} responses, not a whole number of "
                f"groups of stages.{stage}.samples_per_prompt={group_size}; make rollout_batch_size a multiple of "
                f"samples_per_prompt x {n}"
            )

    def prepare(self, policy, reference, value, frozen: list, optimizer):
        """Wrap the trained models for the launch and place the frozen ones (see rlhf.distributed).

        One process: the models as they are. DDP/FSDP: the value model behind `PerTokenHead`, so its
        per-token forward runs through the wrapper that synchronises gradients. DeepSpeed: policy and
        value in one engine (`PolicyAndValue`); under ZeRO-3 the reference and the frozen models (reward
        models) are sharded too. `value` and `reference` may be None (no value model, no KL).
        Returns (policy, reference, value, frozen, optimizer).
        """
        from rlhf.distributed import PolicyAndValue, prepare_frozen, uses_deepspeed, zero_stage

        acc = self.accelerator
        if uses_deepspeed():
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.micro_batch_size // acc.num_processes
            ds["gradient_clipping"] = self.max_grad_norm  # DeepSpeed clips inside its step
            head = PerTokenHead(value) if value is not None else None
            self.engine, optimizer = acc.prepare(PolicyAndValue(policy, head), optimizer)
            policy, value = self.engine.module.policy, self.engine.module.value
        elif acc.num_processes > 1:
            if value is not None:
                policy, value, optimizer = acc.prepare(policy, PerTokenHead(value), optimizer)
            else:
                policy, optimizer = acc.prepare(policy, optimizer)
        elif value is not None:
            policy, value, optimizer = acc.prepare(policy, value, optimizer)
        else:
            policy, optimizer = acc.prepare(policy, optimizer)
        if acc.num_processes > 1 or zero_stage(acc) or acc.mixed_precision == "bf16":
            place = lambda m: prepare_frozen(acc, m)  # noqa: E731
        else:
            place = lambda m: m.to(acc.device)  # noqa: E731
        reference = place(reference) if reference is not None else None
        frozen = [place(m) for m in frozen]
        self.policy, self.value_model = policy, value
        return policy, reference, value, frozen, optimizer

    def adamw(self, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW over parameter `groups` (eps 1e-5), the fused kernel wherever the launch allows it: the
        same AdamW with one pass over all tensors per step instead of a Python loop over them, about 5% of
        a small model's PPO step on CPU (bench/RESULTS.md); not under DeepSpeed or FSDP, which step their own."""
        state = self.accelerator.state
        fused = (self.accelerator.device.type in ("cpu", "cuda") and getattr(state, "deepspeed_plugin", None) is None
                 and getattr(state, "fsdp_plugin", None) is None)
        return torch.optim.AdamW(groups, eps=1e-5, fused=fused or None)

    def trained_parameters(self) -> list:
        """Parameters of the trained models (policy, and value where there is one), for clipping."""
        models = [self.policy] + ([self.value_model] if self.value_model is not None else [])
        return [p for m in models for p in m.parameters()]

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

    def frozen_policy_names(self) -> set[str]:
        """The state-dict names of the policy's frozen parameters (a LoRA policy's base weights), tied aliases
        included: training never changes them."""
        policy = self.accelerator.unwrap_model(self.policy)
        return {n for n, p in policy.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def policy_state_copy(self) -> dict:
        """A CPU copy of the policy state that training changes (gathered where sharded): what `restore_policy`
        takes. Where every rank holds the whole policy the frozen parameters are left out: with LoRA on
        SmolLM2-135M that is 19.5 MB a copy instead of 671 MB; sharded, the gathered state is whole."""
        state = self.gathered_policy_state()
        if state is None:  # not sharded: every rank holds the whole policy
            frozen = self.frozen_policy_names()
            whole = self.accelerator.unwrap_model(self.policy).state_dict()
            state = {k: v for k, v in whole.items() if k not in frozen}
        copies: dict[tuple, torch.Tensor] = {}  # tied weights (an LM head that is the embedding) copied once
        for k, v in state.items():
            key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
            if key not in copies:
                copies[key] = v.detach().to("cpu", copy=True)
            state[k] = copies[key]
        return state

    def local_rows(self, rows: list) -> list:
        """This rank's share of a batch's rows: with N processes rank r takes rows r*B/N .. (r+1)*B/N - 1,
        so the batch over all ranks is still the whole list (groups stay whole: see `check_split`)."""
        n, r = self.num_processes, self.accelerator.process_index
        per_rank = len(rows) // n
        return rows[r * per_rank : (r + 1) * per_rank]

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks (itself with one process)."""
        if self.num_processes == 1:
            return x
        return self.accelerator.reduce(x, reduction="sum")

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """`masked_whiten` with the statistics of the whole rollout batch (all ranks' rows)."""
        return masked_whiten(x, mask, shift_mean=shift_mean, all_reduce=self.all_reduce_sum)

    def batch_mean(self, x: torch.Tensor) -> float:
        """Mean of a per-sequence quantity (B,) over the whole rollout batch (all ranks' rows)."""
        if self.num_processes == 1:
            return x.mean().item()
        return self.accelerator.gather(x).mean().item()

    def unique_share(self, responses: list) -> float:
        """Share of distinct responses in the whole rollout batch (all ranks' rows)."""
        if self.num_processes > 1:
            from accelerate.utils import gather_object

            responses = gather_object(list(responses))
        return len(set(responses)) / max(len(responses), 1)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the ranks (every rank holds an equal share of the batch)."""
        if self.num_processes == 1:
            return stats
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
        values = torch.tensor([float(stats[k]) for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return {**stats, **dict(zip(keys, values.tolist()))}

    def micro_batches(self, traj, per_token: tuple, *, epochs: int, minibatch_size: int, micro_batch_size: int,
                      generator: torch.Generator | None = None):
        """The update's schedule over one rollout batch `traj` (this rank's rows): `epochs` passes, each a
        fresh shuffle cut into minibatches of `minibatch_size` rows (global: each rank takes its share), each
        cut into micro-batches of `micro_batch_size`. Yields (micro-batch trajectory, its slices of the (B, R)
        tensors `per_token` (None stays None), the whole minibatch's counts, last micro-batch of its
        minibatch?, its rows of `traj`): the optimizer steps after the last. Columns that are padding in every row of a
        micro-batch are dropped (`trim_padding`); `counts` ("sequences", "tokens", "value_tokens": over every
        rank) let each micro-batch's loss be its share of the minibatch's, so their gradients sum to the
        whole minibatch's (rlhf/ppo/aggregation.py). The shuffles draw from `generator` (a CPU one) where given,
        else from torch's global generator."""
        from rlhf.rollout import trim_padding

        n = self.num_processes
        for _ in range(epochs):
            device = traj.query_ids.device
            order = (torch.randperm(len(traj.query_ids), device=device) if generator is None else
                     torch.randperm(len(traj.query_ids), generator=generator).to(device))
            for mb_idx in order.split(minibatch_size // n):
                counts = {"sequences": self.minibatch_count(len(mb_idx)),
                          "tokens": self.minibatch_count(traj.response_mask[mb_idx].sum()),
                          "value_tokens": self.minibatch_count(traj.episode_mask[mb_idx].sum())}
                micro = mb_idx.split(micro_batch_size // n)
                for i, rows in enumerate(micro):
                    mb, *sliced = trim_padding(traj.rows(rows),
                                               *(t[rows] if t is not None else None for t in per_token))
                    yield mb, sliced, counts, i == len(micro) - 1, rows

    def minibatch_count(self, count: torch.Tensor) -> torch.Tensor:
        """A count over this rank's rows of a minibatch (tokens, sequences) made global, at least 1: every
        rank's count summed, divided by the ranks, since the wrappers average gradients over ranks. Loss
        terms divided by it sum, over micro-batches and ranks, to the whole minibatch's."""
        count = torch.as_tensor(count, dtype=torch.float32, device=self.accelerator.device)
        if self.num_processes > 1:
            return self.accelerator.reduce(count, reduction="sum").clamp(min=1) / self.num_processes
        return count.clamp(min=1)

    def micro_batch_loss(self, loss_fn, *args):
        """`loss_fn(*args)` of one micro-batch; under DeepSpeed run through the engine's forward (see
        `rlhf.distributed.PolicyAndValue.forward`), which gradient accumulation depends on."""
        if self.engine is not None:
            return self.engine(loss_fn, *args)
        return loss_fn(*args)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backward of one micro-batch. DeepSpeed steps inside backward at the last micro-batch and
        divides by its accumulation count, which our weights already account for."""
        if self.engine is not None:
            self.accelerator.gradient_state._set_sync_gradients(last_micro_batch)
            loss = loss * self.gradient_accumulation_steps
        self.accelerator.backward(loss)

    def generate_extra(self) -> dict:
        """Extra `generate` arguments for the launch: FSDP shards need every rank to run every decode step."""
        from rlhf.distributed import is_fsdp

        return {"synced_gpus": True} if is_fsdp(self.accelerator) else {}

    def restore_policy(self, state: dict) -> None:
        """Load a `policy_state_copy` on every rank (ZeRO-3: into the gathered parameters). Unsharded, only the
        frozen parameters may be missing from it."""
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
            missing, unexpected = policy.load_state_dict(state, strict=False)
            if unexpected or (missing := set(missing) - self.frozen_policy_names()):
                raise RuntimeError(f"restore_policy: the state does not fit the policy: missing {sorted(missing)[:5]}, "
                                   f"unexpected {unexpected[:5]}")
