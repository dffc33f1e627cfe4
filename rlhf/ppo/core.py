"""PPO math for RLHF as small pure functions on tensors.

Sources: Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), Ouyang et al. 2022
(InstructGPT), and Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO").

Conventions used throughout:

* B is the batch of sequences, T the response length (right-padded), V the vocabulary.
* `response_mask` is a bool (B, T) tensor; True marks a real response token, i.e. every generated token
  up to and including the first EOS. Everything after it is padding and must not count.
* Functions never read config objects and never do I/O; hyperparameters are plain floats.
* Statistics come back as detached 0-dim tensors, so callers decide when to pay for a host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "apply_no_eos_penalty",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "has_eos",
    "kl_k1",
    "kl_k3",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "response_mask_from_eos",
    "with_state_after_eos",
]


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is True, over `dim` (all dims when None).

    Masked-out entries are replaced by 0 rather than multiplied by 0, so a NaN or inf sitting in
    padding (e.g. a log-prob of a pad token) cannot leak into the sum.
    """
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is True, over `dim` (all dims when None).

    Where the mask has no True entry the result is 0 (the count is clamped to 1), so an empty
    minibatch or an empty row yields a zero loss contribution instead of NaN.
    """
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is True (a 0-dim tensor).

    The mean is taken over masked positions only. With `unbiased=True` the Bessel correction uses the
    number of True entries n, i.e. sum((x - mean)^2) / (n - 1). For n <= 1 the result is 0 (the
    centred sum is 0 and the divisor is clamped to 1); this avoids a host sync to check n.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    centred_sq = (x - mean) ** 2
    n = mask.sum().to(x.dtype)
    divisor = (n - 1).clamp_min(1) if unbiased else n.clamp_min(1)
    return masked_sum(centred_sq, mask) / divisor


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise `x` to unit variance using statistics of the masked positions only.

    Returns (x - mean) / sqrt(var + eps) where `var` is the unbiased masked variance. With
    `shift_mean=False` the mean is added back, so only the scale changes (used for rewards, where the
    sign of the reward carries meaning; advantages use `shift_mean=True`). Positions outside the mask
    are set to 0, so padding never holds a large value that a later unmasked op could pick up.

    `all_reduce` (a sum over processes, e.g. `accelerator.reduce(t, "sum")`) makes the mean and variance
    those of every process's positions together, when each holds part of a batch: the sums, the count
    and the centred sum of squares are reduced, giving exactly the whole batch's statistics.
    """
    mask = mask.bool()
    if all_reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        totals = all_reduce(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
        n = totals[1]
        mean = totals[0] / n.clamp_min(1)
        var = all_reduce(masked_sum((x - mean) ** 2, mask)) / (n - 1).clamp_min(1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------------


def _scaled_float_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 (or float64) logits divided by `temperature`, without touching the caller's tensor."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float32, torch.float64):
        # Out of place: the caller's logits must stay unchanged.
        return logits if temperature == 1.0 else logits / temperature
    # bf16/fp16 logits: log-softmax over tens of thousands of entries loses precision in half types,
    # so upcast. `.float()` already made a private copy, so dividing in place saves a second
    # (B, T, V) buffer.
    scaled = logits.float()
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled


BLOCK_ELEMENTS = 1 << 20
"""Elements of (..., T, V) logits that `logprobs_from_logits` and `entropy_from_logits` process at once where
the whole is above `WHOLE_ELEMENTS` (see `_in_blocks`)."""
WHOLE_ELEMENTS = 1 << 24


def _in_blocks(fn: Callable[..., torch.Tensor], logits: torch.Tensor, tokens: torch.Tensor | None, *args):
    """`fn(logits, tokens, *args)` (or `fn(logits, *args)` without tokens), a function of each position's
    vocabulary row alone, computed over blocks of positions (the T axis) and concatenated.

    The result is the same to the bit, forward and backward (each row's arithmetic does not change; the
    gradient of `split` is one concatenation). It is faster for large vocabularies: SmolLM2's 49k
    columns over 1000 response tokens make every intermediate 196 MB, which the allocator maps fresh from
    the system and faults in page by page each time; blocks of ~4 MB are reused from the heap and stay in
    cache. The log-probability's forward and backward of that size took 0.40 s whole and 0.20 s in blocks,
    the entropy 0.28 s and 0.08 s (2 CPU cores). Logits of at most `WHOLE_ELEMENTS` go whole.
    """
    if logits.numel() <= WHOLE_ELEMENTS:
        return fn(logits, tokens, *args) if tokens is not None else fn(logits, *args)
    positions = max(1, BLOCK_ELEMENTS // (logits.numel() // logits.shape[-2]))
    blocks = logits.split(positions, dim=-2)
    if tokens is None:
        return torch.cat([fn(b, *args) for b in blocks], dim=-1)
    return torch.cat([fn(b, t, *args) for b, t in zip(blocks, tokens.split(positions, dim=-1))], dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probability of `tokens` under softmax(logits / temperature).

    logits: (B, T, V), position t holds the logits that predict tokens[:, t]. tokens: (B, T) int.
    Returns float32 (B, T).

    The temperature must be the one used to sample the rollouts: the samples come from
    softmax(logits / temperature), so the PPO ratio and the KL penalty are only correct when
    evaluated under that same distribution (Huang et al. 2024); dividing by 1 instead silently
    measures a different policy.

    Computed as logit[token] - logsumexp(logits) rather than log_softmax + gather: the result is the
    same, but autograd then keeps no extra (B, T, V) log-softmax output alive for the backward pass.
    Large logits go in blocks of positions (`_in_blocks`: the same result, faster).
    """
    return _in_blocks(_logprobs, logits, tokens, temperature)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = _scaled_float_logits(logits, temperature)  # (B, T, V)
    picked = torch.gather(scaled, dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(scaled, dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position; logits (B, T, V) -> (B, T).

    Logits of -inf (banned tokens) are allowed: their log-probability is clamped to the most negative
    finite float before multiplying by their probability 0, so 0 * -inf does not produce NaN.
    Large logits go in blocks of positions (`_in_blocks`: the same result, faster).
    """
    return _in_blocks(_entropy, logits, None, temperature)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = _scaled_float_logits(logits, temperature)  # (B, T, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, T, V)
    logp = logp.clamp_min(torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)  # (B, T)


# --------------------------------------------------------------------------------------------------
# Response masks and EOS handling
# --------------------------------------------------------------------------------------------------


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool (B, T) mask, True for tokens up to and including the first EOS of each row.

    Rows without an EOS are True everywhere (the generation was truncated at the length limit).
    Anything after the first EOS (padding, or tokens sampled after EOS) is False, even if the pad id
    equals the EOS id.
    """
    is_eos = response_ids == eos_token_id  # (B, T)
    # Number of EOS strictly before each position; the first EOS itself still counts as real.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # (B, T)
    return eos_before == 0


def with_state_after_eos(response_mask: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
    """`response_mask` (B, T) plus, in each row that ends in EOS before the last column, the column after EOS.

    That column is the state after the final action: its value is the value model's output at the EOS
    token, the one position a value model started from the reward model already scores well. With the
    score placed there (`compute_rewards(..., episode_mask=...)`) instead of on EOS, GAE bootstraps the
    last action's advantage through that value, and the value model learns it too. TRL's PPO (up to
    1.12) does this; a row whose EOS is in the last column, or that has no EOS, has no such column
    and keeps its score on its last token, as there. has_eos: (B,) bool.
    """
    response_mask = response_mask.bool()
    after = torch.zeros_like(response_mask)
    after[:, 1:] = response_mask[:, :-1] & ~response_mask[:, 1:]  # the first False after the Trues
    return response_mask | (after & has_eos.bool().unsqueeze(1))


def has_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool (B,), True where the row contains at least one EOS token."""
    return (response_ids == eos_token_id).any(dim=1)


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) int64 of the last True position in each row of `response_mask` (B, T).

    For masks from `response_mask_from_eos` this is the EOS token when the row has one, else the last
    generated token. A row with no True entry gets index 0; callers that must not touch such rows
    should check `response_mask.any(dim=1)` (as `compute_rewards` does).
    """
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)  # (T,)
    # False positions contribute 0, so an all-False row maxes out at 0.
    return (positions * response_mask.bool()).amax(dim=1)  # (B,)


# --------------------------------------------------------------------------------------------------
# KL estimators and rewards
# --------------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(pi || ref): log pi(y) - log ref(y), for y sampled from pi.

    Unbiased but high-variance and can be negative on individual tokens. This is the estimator the
    RLHF reward penalty uses (Ziegler et al. 2019). Shapes (B, T) -> (B, T).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, max_log_ratio: float = 20.0,
          max_kl: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): (r - 1) - log r with r = ref(y) / pi(y), y ~ pi, clamped.

    Schulman's estimator: unbiased (E_pi[r] = 1) and lower variance than k1, and non-negative on every
    token because e^x >= 1 + x. Evaluated as expm1(d) - d with d = log r, which is accurate for the
    small d typical of a policy close to its reference. r grows exponentially in d: one token the
    policy has made rare but the reference still likes (d = 30) would cost e^30 ~ 1e13 and swamp every
    score, so, as veRL's `low_var_kl` does, d is clamped to [-max_log_ratio, max_log_ratio] and the
    estimate to [0, max_kl] (the lower bound only removes rounding below 0). Shapes (B, T) -> (B, T).

    A clamped token has no gradient: at max_kl = 10 the estimate is flat once r > 13.6, that is once
    pi(y) / ref(y) < 0.073 (d > 2.61), so the KL term stops pulling back exactly the tokens the policy
    has pushed far below the reference, and only the policy loss moves them. (On the other side it
    clamps at d < -11, pi(y) / ref(y) > 6e4.) Raise `max_kl` to keep that pull for longer.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-max_log_ratio, max_log_ratio)  # (B, T), log r
    return (torch.expm1(log_ratio) - log_ratio).clamp(0.0, max_kl)


def apply_no_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Replace the score of every row without an EOS token by the fixed `penalty` score.

    scores (B,) float, has_eos (B,) bool. This is the "missing EOS penalty" of Huang et al. 2024: a
    truncated response is scored `penalty` (e.g. -1) regardless of what the reward model said, which
    stops the policy from learning to ramble past the length limit. Replacing (rather than adding)
    keeps the penalty independent of the reward model's scale.
    """
    return torch.where(has_eos.bool(), scores, torch.full_like(scores, penalty))


def compute_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float,
    response_mask: torch.Tensor,
    episode_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on real tokens, plus the sequence score on the last one.

    scores (B,), kl (B, T) per-token KL estimate (k1 in Ziegler et al.), response_mask (B, T).
    The reward model scores the whole response, so its score lands on the final real token
    (`last_token_index`: the EOS when present); the KL penalty is dense. Padding gets 0. Rows with no
    real token get no score at all, rather than a score on a padding position.

    episode_mask (B, T), a superset of response_mask (`with_state_after_eos`), moves the score to the
    last position of the episode instead; the KL penalty stays on the response tokens.
    """
    response_mask = response_mask.bool()
    episode_mask = response_mask if episode_mask is None else episode_mask.bool()
    rewards = torch.where(response_mask, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_token_index(episode_mask)  # (B,)
    score = torch.where(episode_mask.any(dim=1), scores.to(rewards.dtype), 0.0)  # (B,)
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))  # (B, T)


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    rewards, values, response_mask: (B, T). response_mask must be right-padded (True then False), as
    produced by `response_mask_from_eos`. Rewards and values after the last real token are treated as
    0, so the episode ends there: the bootstrap value after the last real token is 0.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Both outputs are 0 outside the mask and detached: they are regression/weighting targets, and a
    gradient flowing from them into the value head would be a silent bug.
    """
    response_mask = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(response_mask, rewards.detach(), zero)  # (B, T)
    values = torch.where(response_mask, values.detach(), zero)  # (B, T)

    seq_len = rewards.shape[1]
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])  # (B,), V beyond the final position is 0
    reversed_advantages = []
    for t in reversed(range(seq_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * lam * next_advantage
        reversed_advantages.append(next_advantage)
        next_value = values[:, t]
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    advantages = torch.where(response_mask, advantages, zero)
    returns = advantages + values  # values are already 0 outside the mask
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked positions, as a detached 0-dim float tensor.

    1 means the value head predicts the returns perfectly, 0 means it does no better than a constant,
    negative means worse. If the returns have zero variance the ratio is undefined and the result is
    NaN or -inf.
    """
    with torch.no_grad():
        return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)
