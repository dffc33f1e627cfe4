"""Golden tests for the PPO math in rlhf.ppo.core: masked reductions and whitening, the KL estimators,
log-probabilities and entropy, response masks and rewards, GAE (the losses: test_ppo_losses.py).

Expected values are derived by hand, with the arithmetic written next to each one, or come from a plain
loop (GAE; TRL 1.12.0's advantages, transcribed). Padding positions hold large or NaN values on purpose,
so a function that ignored its mask would fail.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhf.ppo import (
    apply_no_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    has_eos,
    kl_k1,
    kl_k3,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask_from_eos,
    with_state_after_eos,
)

ATOL = 1e-6
NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = ATOL) -> None:
    """Assert `actual` equals `expected` elementwise within a tight absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------

# Real entries 1, 2, 4; padding holds 100 (would shift every statistic if the mask were ignored).
X = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean():
    # sum = 1 + 2 + 4 = 7; mean = 7 / 3
    close(masked_sum(X, M), 7.0)
    close(masked_mean(X, M), 7.0 / 3.0)
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4; sums 3 and 4
    close(masked_mean(X, M, dim=1), [1.5, 4.0])
    close(masked_sum(X, M, dim=1), [3.0, 4.0])
    # per column: (1 + 4) / 2 = 2.5, 2 / 1 = 2, no entries -> 0
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])


def test_masked_mean_ignores_nan_in_padding_and_empty_mask_gives_zero():
    x = torch.tensor([[1.0, 3.0, NAN]])
    mask = torch.tensor([[True, True, False]])
    # (1 + 3) / 2 = 2; the NaN sits in padding and must not leak in
    close(masked_mean(x, mask), 2.0)
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_var():
    # mean = 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased: (14/3) / (3 - 1) = 7/3; biased: (14/3) / 3 = 14/9
    close(masked_var(X, M), 7.0 / 3.0)
    close(masked_var(X, M, unbiased=True), 7.0 / 3.0)
    close(masked_var(X, M, unbiased=False), 14.0 / 9.0)
    # A single real entry has variance 0 (not NaN from dividing by n - 1 = 0).
    close(masked_var(X, torch.tensor([[True, False, False], [False, False, False]])), 0.0)


def test_masked_whiten():
    # mean = 7/3, unbiased var = 7/3 (see test_masked_var), so
    # whitened = [1 - 7/3, 2 - 7/3, 4 - 7/3] / sqrt(7/3 + eps) = [-4/3, -1/3, 5/3] / sqrt(7/3 + eps)
    eps = 1e-8
    s = math.sqrt(7.0 / 3.0 + eps)
    close(masked_whiten(X, M, eps=eps), [[-4 / 3 / s, -1 / 3 / s, 0.0], [5 / 3 / s, 0.0, 0.0]])
    # shift_mean=False adds the mean 7/3 back to real entries; padding stays 0.
    m = 7.0 / 3.0
    close(
        masked_whiten(X, M, shift_mean=False, eps=eps),
        [[-4 / 3 / s + m, -1 / 3 / s + m, 0.0], [5 / 3 / s + m, 0.0, 0.0]],
    )


def test_masked_whiten_gives_zero_mean_unit_variance_on_random_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3.0 + 5.0
    mask = torch.rand(4, 9, generator=g) > 0.3
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-12)
    close(masked_var(w, mask), 1.0, atol=1e-6)
    assert torch.all(w[~mask] == 0)


def test_whitening_with_an_all_reduce_uses_every_ranks_positions():
    """Two threads stand for two ranks; their all-reduce sums what both pass in. Each whitens its half
    with the statistics of the whole batch."""
    torch.manual_seed(2)
    x = torch.randn(6, 4)
    mask = torch.rand(6, 4) > 0.3
    whole = masked_whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def all_reduce(t):
            slots[r] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        rows = slice(3 * r, 3 * r + 3)
        out[r] = masked_whiten(x[rows], mask[rows], all_reduce=all_reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(out), whole, atol=1e-6)
    assert not torch.allclose(masked_whiten(x[:3], mask[:3]), whole[:3], atol=1e-3)  # local statistics differ


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # k1 = logp - ref = [-1 + 1.5, -2 + 1] = [0.5, -1.0]
    close(kl_k1(logp, ref), [[0.5, -1.0]])
    # k3: d = ref - logp = [-0.5, 1.0]; r = e^d; k3 = (r - 1) - d
    #   token 0: e^-0.5 - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    #   token 1: e^1 - 1 - 1     = 2.7182818285 - 2   = 0.7182818285
    # (with logp and ref swapped token 0 would be e^0.5 - 1.5 = 0.1487212707)
    close(kl_k3(logp, ref), [[0.1065306597, 0.7182818285]])


def test_k3_is_clamped_as_verl_does():
    # logp = 0 and ref = d on every token, so log r = d; log r is clamped to [-20, 20], k3 to [0, 10]
    d = torch.tensor([[2.0, -5.0, 3.0, 30.0, -30.0]], dtype=torch.float64)
    logp = torch.zeros_like(d)
    #   d = 2:   e^2 - 1 - 2   = 7.3890560989 - 3 = 4.3890560989        (inside both bounds)
    #   d = -5:  e^-5 - 1 + 5  = 0.0067379470 + 4 = 4.0067379470        (inside both bounds)
    #   d = 3:   e^3 - 1 - 3   = 20.0855369232 - 4 = 16.0855369232 -> 10
    #   d = 30:  log r -> 20:  e^20 - 21 = 4.85e8 -> 10   (unclamped: e^30 - 31 = 1.07e13)
    #   d = -30: log r -> -20: e^-20 - 1 + 20 = 19.000000002 -> 10
    close(kl_k3(logp, d), [[4.3890560989, 4.0067379470, 10.0, 10.0, 10.0]])
    # the bounds are arguments. max_log_ratio = 1: log r -> 1 for d = 2 and 3: e - 1 - 1 = 0.7182818285;
    # log r -> -1 for d = -5: e^-1 - 1 + 1 = 0.3678794412
    close(kl_k3(logp, d, max_log_ratio=1.0, max_kl=100.0)[:, :3], [[0.7182818285, 0.3678794412, 0.7182818285]])



def test_k3_has_no_gradient_once_the_clamp_holds():
    # k3 = r - 1 - log r reaches 10 at r = 13.61 (log r = 2.6109, pi/ref = 0.0735): d/dlogp k3 = 1 - r
    # below that, 0 past it. d = 2.6: 1 - e^2.6 = -12.4637; d = 2.62: clamped, 0.
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[2.6, 2.62]], dtype=torch.float64)
    kl_k3(logp, ref).sum().backward()
    close(logp.grad, [[1 - math.exp(2.6), 0.0]])

def test_kl_estimators_zero_when_equal_and_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(8, 16, generator=g) * 5.0
    ref = -torch.rand(8, 16, generator=g) * 5.0
    assert torch.all(kl_k1(logp, logp) == 0)
    assert torch.all(kl_k3(logp, logp) == 0)
    assert torch.all(kl_k3(logp, ref) >= 0)
    # Tiny differences must not round below 0 either.
    assert torch.all(kl_k3(logp, logp + 1e-7) >= 0)


# --------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------------


def test_logprobs_from_logits_with_temperature():
    # logits [0, ln 2, ln 3]: at T=1 softmax is [1, 2, 3] / 6.
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(3.0)]] * 2])  # (1, 2, 3)
    tokens = torch.tensor([[2, 0]])
    # T=1: log p(2) = ln(3/6) = ln(1/2); log p(0) = ln(1/6)
    close(logprobs_from_logits(logits, tokens), [[math.log(0.5), math.log(1 / 6)]])
    # T=2: softmax(logits / 2) is proportional to [1, sqrt 2, sqrt 3], Z = 1 + sqrt 2 + sqrt 3
    z = 1.0 + math.sqrt(2.0) + math.sqrt(3.0)
    close(
        logprobs_from_logits(logits, tokens, temperature=2.0),
        [[math.log(math.sqrt(3.0) / z), math.log(1.0 / z)]],
    )
    # The caller's logits are not modified by the temperature division.
    close(logits[0, 0], [0.0, math.log(2.0), math.log(3.0)])


def test_logprobs_match_log_softmax_gather_and_upcast_half_precision():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g) * 4.0
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature=0.7), expected, atol=1e-5)
    out = logprobs_from_logits(logits.bfloat16(), tokens, temperature=0.7)
    assert out.dtype == torch.float32
    rounded = logits.bfloat16().float()
    ref = torch.log_softmax(rounded / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(out, ref, atol=1e-5)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens, temperature=0.0)


@pytest.mark.parametrize("sliced", [False, True])
def test_large_logits_go_in_blocks_with_the_same_bits_forward_and_backward(monkeypatch, sliced):
    """Above WHOLE_ELEMENTS the log-probabilities and the entropy are computed over blocks of positions
    (SmolLM2's vocabulary makes whole intermediates of 196 MB); the blocks must give the whole
    computation's bits, values and gradients alike, also for the (B, T - 1 of T, V) view the padded
    forward passes in. Small limits here force 4-position blocks on a small tensor."""
    import rlhf.ppo.core as core

    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 10, 7, generator=g) * 3
    base[..., 0] = float("-inf")  # a banned token
    tokens = torch.randint(1, 7, (3, 9 if sliced else 10), generator=g)
    weights = torch.randn(tokens.shape, generator=g)

    def run():
        logits = base.clone().requires_grad_(True)
        view = logits[:, :-1] if sliced else logits
        lp = core.logprobs_from_logits(view, tokens, temperature=0.7)
        (lp * weights).sum().backward()
        return lp.detach(), logits.grad, core.entropy_from_logits(view.detach(), temperature=0.7)

    whole = run()
    calls = []
    monkeypatch.setattr(core, "WHOLE_ELEMENTS", 20)
    monkeypatch.setattr(core, "BLOCK_ELEMENTS", 3 * 4 * 7)  # 4 positions of 3 rows
    original = core._logprobs
    monkeypatch.setattr(core, "_logprobs", lambda *a: calls.append(a[0].shape) or original(*a))
    blocked = run()
    assert [c[1] for c in calls] == ([4, 4, 1] if sliced else [4, 4, 2])  # blocks were used
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)


def test_entropy_from_logits():
    # Uniform over V = 5 at any temperature: H = ln 5
    logits = torch.full((2, 3, 5), 0.7)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(5.0)))
    close(entropy_from_logits(logits, temperature=2.0), torch.full((2, 3), math.log(5.0)))
    # logits [0, ln 3]: p = [1/4, 3/4]; H = 1/4 ln 4 + 3/4 ln(4/3) = ln 4 - 3/4 ln 3 = 0.5623351446
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(two), [[math.log(4.0) - 0.75 * math.log(3.0)]])
    # A banned token (-inf logit) has p = 0 and contributes 0, not NaN.
    banned = torch.tensor([[[0.0, math.log(3.0), -math.inf]]])
    close(entropy_from_logits(banned), [[math.log(4.0) - 0.75 * math.log(3.0)]])
    # T=2: logits / 2 = [0, ln sqrt 3]: p = [1, sqrt 3] / (1 + sqrt 3); H = -sum p ln p
    p = [1 / (1 + math.sqrt(3.0)), math.sqrt(3.0) / (1 + math.sqrt(3.0))]
    close(entropy_from_logits(two, temperature=2.0), [[-sum(q * math.log(q) for q in p)]])


# --------------------------------------------------------------------------------------------------
# Response masks, EOS, rewards
# --------------------------------------------------------------------------------------------------

EOS = 2
RESPONSES = torch.tensor(
    [
        [5, 2, 0, 0],  # EOS in the middle, then padding
        [5, 6, 7, 2],  # EOS at the last position
        [5, 6, 7, 8],  # no EOS: truncated at the length limit
        [2, 2, 2, 2],  # EOS first; pad id == EOS id
        [5, 2, 7, 2],  # tokens and a second EOS after the first EOS
    ]
)


def test_response_mask_has_eos_and_last_index():
    close(
        response_mask_from_eos(RESPONSES, EOS).float(),
        [
            [1, 1, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            [1, 0, 0, 0],
            [1, 1, 0, 0],
        ],
    )
    assert has_eos(RESPONSES, EOS).tolist() == [True, True, False, True, True]
    assert last_token_index(response_mask_from_eos(RESPONSES, EOS)).tolist() == [1, 3, 3, 0, 1]
    # An all-False row is defined to give index 0.
    assert last_token_index(torch.zeros(2, 4, dtype=torch.bool)).tolist() == [0, 0]


def test_compute_rewards_places_score_at_eos_or_last_token():
    mask = response_mask_from_eos(RESPONSES[:3], EOS)  # rows: EOS at 1, EOS at 3, no EOS
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor(
        [
            [0.5, -1.0, 9.0, 9.0],  # 9.0 in padding must be ignored
            [0.2, 0.4, 0.0, 1.0],
            [1.0, 1.0, 1.0, 1.0],
        ]
    )
    # reward = -0.1 * kl on real tokens, plus the score on the last real token:
    #   row 0: [-0.05, +0.1 + 1.0, 0, 0]          = [-0.05, 1.1, 0, 0]
    #   row 1: [-0.02, -0.04, 0, -0.1 + 2.0]      = [-0.02, -0.04, 0, 1.9]
    #   row 2: [-0.1, -0.1, -0.1, -0.1 + 3.0]     = [-0.1, -0.1, -0.1, 2.9]
    close(
        compute_rewards(scores, kl, 0.1, mask),
        [[-0.05, 1.1, 0.0, 0.0], [-0.02, -0.04, 0.0, 1.9], [-0.1, -0.1, -0.1, 2.9]],
    )
    # A row without any real token gets nothing, not a score on padding.
    empty = torch.zeros(1, 3, dtype=torch.bool)
    close(compute_rewards(torch.tensor([5.0]), torch.ones(1, 3), 0.1, empty), [[0.0] * 3])


def test_no_eos_penalty_replaces_score():
    scores = torch.tensor([0.5, -0.3, 2.0, 4.0])
    eos = torch.tensor([True, False, True, False])
    # rows without EOS get exactly the penalty (-1), whatever their score was
    close(apply_no_eos_penalty(scores, eos, -1.0), [0.5, -1.0, 2.0, -1.0])
    # The usual wiring: penalise, then place on the last token (row 2 has no EOS: score 3 -> -1).
    mask = response_mask_from_eos(RESPONSES[:3], EOS)
    penalised = apply_no_eos_penalty(torch.tensor([1.0, 2.0, 3.0]), has_eos(RESPONSES[:3], EOS), -1.0)
    rewards = compute_rewards(penalised, torch.zeros(3, 4), 0.1, mask)
    close(rewards, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, -1.0]])


def test_state_after_eos_is_added_only_where_a_row_ended_in_eos_with_room_after_it():
    mask = torch.tensor([
        [1, 1, 0, 0],  # EOS at 1: the state after it is column 2
        [1, 0, 0, 0],  # EOS at 0: column 1
        [1, 1, 1, 1],  # EOS in the last column: no room
        [1, 1, 1, 1],  # truncated, no EOS: the episode did not end
        [1, 1, 0, 0],  # ends at 1 without EOS (has_eos False): nothing added
        [0, 0, 0, 0],  # no token at all
    ], dtype=torch.bool)
    eos = torch.tensor([True, True, True, False, False, True])
    out = with_state_after_eos(mask, eos)
    assert out.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_compute_rewards_puts_the_score_after_eos_and_keeps_kl_on_the_response():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    episode = with_state_after_eos(mask, torch.tensor([True, True]))  # row 0 gains column 2, row 1 nothing
    kl = torch.tensor([[0.5, -1.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])  # 9.0 past EOS must not count
    # row 0: KL on columns 0-1 only, the score 1.0 alone at column 2: [-0.05, 0.1, 1.0, 0]
    # row 1: EOS in the last column, so the score stays there:       [-0.1, -0.1, -0.1, -0.1 + 2.0]
    close(compute_rewards(torch.tensor([1.0, 2.0]), kl, 0.1, mask, episode),
          [[-0.05, 0.1, 1.0, 0.0], [-0.1, -0.1, -0.1, 1.9]])


def trl_112_advantages(logprobs, ref_logprobs, values, scores, lengths, kl_coef, gamma, lam):
    """TRL 1.12.0's PPOTrainer steps 3-6 (trl/experimental/ppo/ppo_trainer.py), transcribed to plain loops.

    lengths[b] is the index of row b's last real token (TRL's `sequence_lengths`). Returns the whitened
    advantages (0 past the last token) and the returns, both as lists of rows.
    """
    batch, seq_len = len(values), len(values[0])
    rewards, vals = [], []
    for b in range(batch):
        last = lengths[b]
        # logprobs past `last` are INVALID_LOGPROB in both, so their k1 KL is 0; values past last+1 are 0
        rewards.append([-kl_coef * (logprobs[b][t] - ref_logprobs[b][t]) if t <= last else 0.0 for t in range(seq_len)])
        vals.append([values[b][t] if t <= last + 1 else 0.0 for t in range(seq_len)])
        end = last + 1 if last + 1 < seq_len else last
        rewards[b][end] += scores[b]
    advantages, returns = [], []
    for b in range(batch):
        row, last_gae = [0.0] * seq_len, 0.0
        for t in reversed(range(seq_len)):
            next_value = vals[b][t + 1] if t < seq_len - 1 else 0.0
            last_gae = rewards[b][t] + gamma * next_value - vals[b][t] + gamma * lam * last_gae
            row[t] = last_gae
        advantages.append(row)
        returns.append([a + v for a, v in zip(row, vals[b])])
    real = [advantages[b][t] for b in range(batch) for t in range(lengths[b] + 1)]
    mean = sum(real) / len(real)
    var = sum((x - mean) ** 2 for x in real) / (len(real) - 1)
    whitened = [[(advantages[b][t] - mean) / math.sqrt(var + 1e-8) if t <= lengths[b] else 0.0
                 for t in range(seq_len)] for b in range(batch)]
    return whitened, returns


def test_score_after_eos_gives_trl_112_advantages_and_returns():
    g = torch.Generator().manual_seed(5)
    lengths = [2, 6, 0, 4]  # last real token; row 1 ends in the last column (or was truncated)
    batch, seq_len = len(lengths), 7
    mask = torch.arange(seq_len)[None, :] <= torch.tensor(lengths)[:, None]
    logprobs, ref_logprobs, values = (torch.randn(batch, seq_len, generator=g, dtype=torch.float64) for _ in range(3))
    scores = torch.randn(batch, generator=g, dtype=torch.float64)
    expected_adv, expected_ret = trl_112_advantages(logprobs.tolist(), ref_logprobs.tolist(), values.tolist(),
                                                    scores.tolist(), lengths, 0.05, 1.0, 0.95)
    episode = with_state_after_eos(mask, torch.tensor([True, True, True, True]))
    rewards = compute_rewards(scores, kl_k1(logprobs, ref_logprobs), 0.05, mask, episode)
    adv, ret = gae(rewards, values, episode, 1.0, 0.95)
    close(masked_whiten(adv, mask), expected_adv, atol=1e-10)
    expected_ret = torch.tensor(expected_ret, dtype=torch.float64)
    close(torch.where(episode, ret, 0.0), torch.where(episode, expected_ret, 0.0), atol=1e-10)
    # Without the state after EOS the score's row-0 return differs (no bootstrap through V at column 3).
    plain_adv, _ = gae(compute_rewards(scores, kl_k1(logprobs, ref_logprobs), 0.05, mask), values, mask, 1.0, 0.95)
    expected_adv = torch.tensor(expected_adv, dtype=torch.float64)
    assert not torch.allclose(masked_whiten(plain_adv, mask), expected_adv, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain double loop: each row is an episode of `length` tokens; V after the last token is 0."""
    batch, seq_len = len(rewards), len(rewards[0])
    advantages = [[0.0] * seq_len for _ in range(batch)]
    returns = [[0.0] * seq_len for _ in range(batch)]
    for b in range(batch):
        last_gae = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_gae = delta + gamma * lam * last_gae
            advantages[b][t] = last_gae
            returns[b][t] = last_gae + values[b][t]
    return advantages, returns


def test_gae_hand_values():
    # Real tokens t = 0..2, padding at t = 3 holds reward 5 and value 7 that must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72
    #   t=2: delta = 1 + 0.9 * 0   - 0.3 =  0.7;   A2 = 0.7
    #   t=1: delta = 0 + 0.9 * 0.3 - 0.4 = -0.13;  A1 = -0.13 + 0.72 * 0.7   = 0.374
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14;  A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]
    # (gamma and lam swapped would give A1 = -0.16 + 0.504 = 0.344)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.7, 0.0]], atol=1e-12)
    close(ret, [[0.62928, 0.774, 1.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5), (0.5, 0.9), (1.0, 0.0)])
def test_gae_matches_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(3)
    lengths = [7, 4, 1, 6, 0]
    seq_len = 7
    rewards = torch.randn(len(lengths), seq_len, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), seq_len, generator=g, dtype=torch.float64)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    expected_adv, expected_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    close(adv, expected_adv, atol=1e-12)
    close(ret, expected_ret, atol=1e-12)


def test_gae_gamma_one_lam_one_is_future_reward_sum_minus_value():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = sum_{k >= t, k real} r_k - V_t; R_t = sum_{k >= t, k real} r_k
    masked_r = rewards * mask
    future = masked_r.flip(1).cumsum(1).flip(1)
    close(adv, (future - values.detach()) * mask, atol=1e-12)
    close(ret, future * mask, atol=1e-12)
    # Targets carry no gradient back into the value head.
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # perfect prediction: Var(R - V) = 0 -> 1
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    # V = [1, 2, 3, 3]: R - V = [0, 0, 0, 1], mean 0.25, unbiased var = (3 * 0.0625 + 0.5625) / 3 = 0.25
    # Var(R): mean 2.5, (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3 -> EV = 1 - 0.25 / (5/3) = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, -50.0]])
    close(explained_variance(values, returns, mask), 0.85)
    # predicting the constant mean explains nothing: EV = 0
    close(explained_variance(torch.full((1, 5), 2.5), returns, mask), 0.0)
