"""Sampling responses from a causal LM through its chat template (evaluation, on-policy pairs, chat).

Prompts are left-padded so every row's last prompt token sits at the same position and generation
appends to all rows at once; `generate` derives position ids from the attention mask.

Every sample is drawn under a generation config built from the caller's settings alone: a checkpoint's
own `generation_config.json` (Hub models often carry `repetition_penalty`, `no_repeat_ngram_size`,
`min_new_tokens`, `top_k`, ...) would otherwise reshape the distribution sampled from, and PPO would
optimise a policy other than the one it samples (its logprobs are computed from the plain logits).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig


@dataclass
class Sample:
    """One generated response."""

    prompt: str
    response: str
    ended: bool
    """True when the model emitted EOS before max_new_tokens."""
    num_tokens: int
    """Response tokens up to and including EOS."""


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat-template rendering of one user turn, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_prompts(tokenizer, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Left-padded input ids and attention mask for chat prompts (BOS comes from the template)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) if device is not None else v for k, v in enc.items()}


def generation_config(
    tokenizer, *, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> GenerationConfig:
    """Sampling at `temperature` (greedy when 0), nucleus `top_p` and `top_k` (0 = off), and nothing else.

    Every setting that reshapes the next-token distribution is set to its neutral value, so the tokens
    are drawn from softmax(logits / temperature), the distribution `policy_forward` scores; EOS and pad
    are the tokenizer's. Pass it to `generate` below, which also keeps the model's own config out.
    """
    from transformers import GenerationConfig

    greedy = temperature == 0
    decoding = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    }
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_length=0, num_beams=1, num_return_sequences=1,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, length_penalty=1.0, guidance_scale=1.0, renormalize_logits=False,
        remove_invalid_values=False, use_cache=True, output_scores=False, output_logits=False,
        return_dict_in_generate=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **decoding,
    )


class GumbelMax:
    """A logits processor that makes greedy decoding sample: argmax(scores + G), G i.i.d. Gumbel(0, 1).

    The Gumbel-max trick picks token i with probability softmax(scores)_i exactly, the distribution
    `torch.multinomial` draws from in transformers' sampling. On CPU `torch.multinomial` spends most of
    its time in `exponential_` over the (B, V) probabilities (4.7 ms for 64 x 4096 on 2 cores, 37% of the
    tiny model's whole `generate` of 32 tokens); the uniform draws and two logs here take ~1.2 ms. Tokens
    removed by top-k/top-p (-inf) stay impossible; u is kept above 0 so every noise value is finite.
    Draws come from torch's global generator, like `torch.multinomial`'s, so a seed fixes them.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand_like(scores).clamp_(min=torch.finfo(scores.dtype).tiny)
        return scores - torch.log(-torch.log(u))


class InverseCDF:
    """A logits processor that makes greedy decoding sample by inverting the cumulative distribution: with
    c = cumsum(softmax(scores)) and one uniform u per row, the token k with c_{k-1} <= u c_V < c_k, which has
    probability softmax(scores)_k; every other score becomes -inf, so the argmax is k.

    The same distribution as `GumbelMax` and `torch.multinomial` from one random number per row instead of
    one per vocabulary entry: 0.25 against 2.6 ms for 64 x 4096 on 2 CPU cores, and `generate` of the tiny
    model 13% faster a token. A token removed by top-k/top-p (probability 0) leaves c flat, so it is never
    picked. On CPU torch sums a float32 cumsum in float64 and rounds each c_k once, so a probability is off
    by at most ~1e-7. Draws come from torch's global generator, so a seed fixes them. Float rounding of the
    scores moves every boundary c_k a little, so it changes a draw more often than Gumbel's argmax (which
    moves only where two noisy scores nearly tie): same seed and same arithmetic, same tokens; another
    CPU or batch shape, now and then another token.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores, dim=-1, dtype=torch.float32).cumsum(-1)
        u = torch.rand(len(scores), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)


DRAWS = {"gumbel": GumbelMax, "inverse_cdf": InverseCDF}
"""The samplers that run transformers' greedy decoding over the warped scores and a draw of their own."""
SAMPLERS = ("multinomial", *DRAWS)
"""How `generate` draws each sampled token: multinomial (`torch.multinomial`, transformers' own), gumbel
(`GumbelMax`) or inverse_cdf (`InverseCDF`): the same distribution, other random draws."""


class SampledLogprobs:
    """A logits processor that keeps the log-probability of each token `generate` draws, under
    softmax(logits / temperature): the distribution `policy_forward` scores, from the same logits the
    token is drawn from (before top-k/top-p, as `policy_forward` has no top-k/top-p either).

    Put first in the processor list, so it reads the model's raw logits. Called at each step with the
    tokens so far, it picks the previous step's log-probability of the token that step drew
    (`input_ids[:, -1]`); `finish(sequences)` picks the last one. Costs one log-softmax over (B, V) a
    token, where scoring the rollout afterwards costs a forward pass over all of it.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V) log-probabilities of the last step
        self.picked: list[torch.Tensor] = []  # (B,) per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        scaled = scores if self.temperature == 1.0 else scores / self.temperature
        self.previous = torch.log_softmax(scaled.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, R) log-probabilities of the R tokens drawn (the last R columns of `sequences`)."""
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
            self.previous = None
        return torch.stack(self.picked, dim=1) if self.picked else sequences.new_zeros(len(sequences), 0).float()


def greedy_sampling(config: GenerationConfig, sampler: str) -> tuple[GenerationConfig, list]:
    """`config` (sampling) as greedy decoding over the same warped scores and the draw of `sampler` (one of
    DRAWS): (config, the logits processors to pass to `generate`). transformers' own warpers, in its own
    order (temperature, top-k, top-p), then the draw."""
    import copy

    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = []
    if config.temperature not in (None, 1.0):
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    greedy = copy.deepcopy(config)
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, 1.0, None, 1.0
    return greedy, [*processors, DRAWS[sampler]()]


def prefill_shared_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The cache of every row's prompt but its last token, each distinct prompt run through the model once
    (a GRPO group's rows share theirs): a cache to hand `generate` with the same rows, or None where every
    row is distinct, the prompts are one token long, or the model's cache cannot be copied across rows.

    Rows (left-padded, `encode_prompts`) are matched on their ids and mask; the distinct ones are prefilled
    with the position ids `generate` derives from the mask, and the cache is copied to every row
    (`Cache.reorder_cache`, what beam search uses). `generate` then runs the last prompt token of every row
    through the cache before the first draw, as it does after a cache it was given. The first token's
    logits come from a one-token step instead of the prompt's full pass, so they differ by float rounding
    (~1e-5 on the tiny model): the same samples under `GumbelMax`, and under `InverseCDF` a row now and
    then draws another token (3 of 640 rows of 32 tokens on the tiny model)."""
    if input_ids.shape[1] < 2:
        return None
    width = input_ids.shape[1]
    distinct, rows = torch.unique(torch.cat([input_ids, attention_mask.long()], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(input_ids):
        return None
    ids, mask = distinct[:, :width], distinct[:, width:]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    holder = model.get_base_model() if hasattr(model, "get_base_model") else model
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(holder.forward).parameters else {}
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
                **last_only)
    cache = out.cache if "cache" in out else out.past_key_values  # the output's name follows the argument's
    if not hasattr(cache, "reorder_cache"):
        return None
    cache.reorder_cache(rows)
    return cache


def generate(model, config: GenerationConfig, bf16: bool = False, sampler: str = "multinomial",
             logprobs: bool = False, shared_prefill: bool = False, **inputs):
    """`model.generate(**inputs)` under `config` and no other generation setting: sequences (B, P + R), and
    with `logprobs` also each drawn token's log-probability (B, R) as `SampledLogprobs` keeps them.

    `bf16`: sample under bfloat16 autocast (the weights stay float32). On a CPU with AVX512-BF16 this
    sampled SmolLM2-135M 1.75x faster (a batch of 64 prompts x 48 tokens on 2 cores: 8 s against 14 s in
    the preferences stage of configs/smol.yaml); the tokens come from a slightly different distribution
    than the float32 model's, which every logprob, KL and update still computes in float32 (as an
    inference engine's samples are trained on).

    `generate` fills every field `config` leaves unset from the model's own generation config, and some
    processors are off only while their field is unset (`bad_words_ids`, `suppress_tokens`,
    `forced_bos_token_id`, `sequence_bias`, `min_p`, ...). So the model's config is set aside for the
    call: the one given stands in for it. `inputs` are the tensors and launch arguments (`synced_gpus`).

    `sampler` (SAMPLERS): how a sampling `config` draws each token; gumbel and inverse_cdf run transformers'
    greedy decoding over the warped scores and a draw of their own (`greedy_sampling`).

    `shared_prefill`: run each distinct prompt through the model once, not once per row that repeats it
    (`prefill_shared_prompts`; a group of G responses to one prompt prefills it once instead of G times).
    The same samples but for float rounding (`prefill_shared_prompts`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    # `generate` runs the processors given before the warpers it makes itself (temperature, top-p), so a
    # processor first in this list reads the raw logits under either sampler
    processors, recorder = [], None
    if logprobs:
        if bf16:
            raise ValueError("logprobs: the log-probabilities of a bfloat16 sampling are not the float32 "
                             "policy's; score the rollout with a forward pass instead")
        recorder = SampledLogprobs(config.temperature if config.do_sample else 1.0)
        processors.append(recorder)
    if sampler in DRAWS and config.do_sample:
        config, draw = greedy_sampling(config, sampler)
        processors += draw
    if processors:
        from transformers import LogitsProcessorList

        inputs["logits_processor"] = LogitsProcessorList(processors)
    # a PEFT model generates through its base model, which is where `generate` reads the config
    holder = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = holder.generation_config
    holder.generation_config = config
    # Autocast keeps its bfloat16 copy of a weight for the whole call only for leaf tensors that require
    # grad; frozen weights (LoRA's base model, a reference) would be cast again at every new token.
    frozen = [p for p in model.parameters() if bf16 and not p.requires_grad and p.dtype == torch.float32]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            if shared_prefill and (cache := prefill_shared_prompts(model, inputs["input_ids"],
                                                                   inputs["attention_mask"])) is not None:
                inputs[cache_argument(holder)] = cache
            sequences = model.generate(**inputs, generation_config=config)
        return (sequences, recorder.finish(sequences)) if recorder is not None else sequences
    finally:
        for p in frozen:
            p.requires_grad_(False)
        holder.generation_config = own


def cache_argument(model) -> str:
    """The name under which this transformers' `generate` takes a cache: `cache` (5.25 on; `past_key_values`
    is deprecated there) or `past_key_values` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.prepare_inputs_for_generation).parameters else "past_key_values"


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
    bf16: bool = False,
) -> list[Sample]:
    """Sample one response per prompt (greedy when temperature is 0), under these settings alone
    (`bf16`: under bfloat16 autocast, see `generate`)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    config = generation_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out: list[Sample] = []
    chunks = list(batches(prompts, batch_size))
    for chunk in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) < 2):
        enc = encode_prompts(tokenizer, chunk, model.device)
        seqs = generate(model, config, bf16=bf16, **enc)
        responses = seqs[:, enc["input_ids"].shape[1] :]
        for prompt, ids in zip(chunk, responses.tolist()):
            ended = eos in ids
            ids = ids[: ids.index(eos) + 1] if ended else ids
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Sample(prompt, text, ended, len(ids)))
    model.train(was_training)
    return out
