"""The critic-free estimators of rlhf.ppo.estimators, against values computed by hand or by plain loops.

Golden values carry their arithmetic. Most tests share one batch (two prompts, four responses each, of
lengths 1 to 4) whose group means and deviations are small enough to write out; the random-return test
checks GRPO and RLOO against a plain loop over the groups, and `whitened` is `masked_whiten` by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import masked_whiten
from rlhf.ppo.estimators import (ESTIMATORS, group_mean_baseline, group_std, leave_one_out_baseline, returns_to_go,
                                 sequence_returns)

# Two prompts, K = 4 responses each; scores only (no KL), responses of lengths 1..4, no state after EOS.
SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
LENGTHS = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1])
T = 5
MASK = torch.arange(T).unsqueeze(0) < LENGTHS.unsqueeze(1)  # (8, 5)


def score_rewards(scores=SCORES, mask=MASK):
    """Per-token rewards with the score on each row's last real token (what compute_rewards gives at KL 0)."""
    rewards = torch.zeros(mask.shape)
    rewards[torch.arange(len(scores)), mask.sum(1) - 1] = scores
    return rewards


def run(name, rewards=None, scores=SCORES, mask=MASK, k=4, whiten=masked_whiten, gamma=1.0):
    rewards = score_rewards(scores, mask) if rewards is None else rewards
    adv, ret = ESTIMATORS[name](rewards, scores, mask, mask, None, k, whiten=whiten, gamma=gamma)
    return adv, ret


def per_sequence(adv, mask=MASK):
    """The one advantage each sequence's tokens share (and check they do share it)."""
    first = adv[:, 0]
    assert torch.equal(torch.where(mask, adv, first.unsqueeze(1)), first.unsqueeze(1).expand_as(adv))
    assert (adv[~mask] == 0).all()
    return first


def test_grpo_divides_by_the_groups_std():
    # group 1: returns 1, 2, 3, 6 -> mean 3, deviations -2, -1, 0, 3; unbiased variance (4+1+0+9)/3 = 14/3
    # group 2: returns 0, 0, 1, 1 -> mean 0.5, deviations -.5, -.5, .5, .5; variance (4 x .25)/3 = 1/3
    adv, ret = run("grpo")
    s1, s2 = math.sqrt(14 / 3), math.sqrt(1 / 3)
    expected = torch.tensor([-2 / s1, -1 / s1, 0.0, 3 / s1, -0.5 / s2, -0.5 / s2, 0.5 / s2, 0.5 / s2])
    assert torch.allclose(per_sequence(adv), expected, atol=1e-5) and ret is None


def test_dr_grpo_keeps_the_scale():
    adv, _ = run("dr_grpo")
    assert torch.allclose(per_sequence(adv), torch.tensor([-2.0, -1, 0, 3, -0.5, -0.5, 0.5, 0.5]))


def test_rloo_subtracts_the_mean_of_the_others():
    # group 1: 1 - (2 + 3 + 6) / 3 = -8/3; 2 - (1 + 3 + 6) / 3 = -4/3; 3 - (1 + 2 + 6) / 3 = 0; 6 - 6/3 = 4
    # group 2: 0 - (0 + 1 + 1) / 3 = -2/3 twice, 1 - (0 + 0 + 1) / 3 = 2/3 twice
    adv, _ = run("rloo")
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3])
    assert torch.allclose(per_sequence(adv), expected, atol=1e-6)
    assert torch.allclose(expected, 4 / 3 * torch.tensor([-2.0, -1, 0, 3, -0.5, -0.5, 0.5, 0.5]))  # K/(K-1) x dr_grpo


def test_group_estimators_against_a_plain_loop_on_random_returns():
    torch.manual_seed(0)
    scores, k = torch.randn(12), 3
    adv_grpo, _ = run("grpo", scores=scores, mask=torch.ones(12, 2, dtype=torch.bool), k=k)
    adv_rloo, _ = run("rloo", scores=scores, mask=torch.ones(12, 2, dtype=torch.bool), k=k)
    for g in range(4):
        rs = [float(x) for x in scores[g * k:(g + 1) * k]]
        mean = sum(rs) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (k - 1))
        for i, r in enumerate(rs):
            row = g * k + i
            assert adv_grpo[row, 0].item() == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
            others = (sum(rs) - r) / (k - 1)
            assert adv_rloo[row, 0].item() == pytest.approx(r - others, abs=1e-6)


def test_kl_in_the_reward_is_part_of_the_group_return():
    # with a per-token KL penalty in the rewards, a sequence's return is score + the penalties it got
    rewards = score_rewards() - 0.1 * MASK.float()  # -0.1 per real token
    adv, _ = run("dr_grpo", rewards=rewards)
    returns = SCORES - 0.1 * LENGTHS  # 0.9, 1.8, 2.7, 5.6 | -0.4, -0.3, 0.8, 0.9
    expected = torch.cat([returns[:4] - returns[:4].mean(), returns[4:] - returns[4:].mean()])
    assert torch.allclose(per_sequence(adv), expected, atol=1e-6)


def test_reinforce_pp_whitens_returns_to_go_over_the_batch():
    # rewards: -0.1 KL penalty per token, the score on the last token; G_t = sum of the rewards from t on
    rewards = score_rewards() - 0.1 * MASK.float()
    adv, ret = run("reinforce_pp", rewards=rewards)
    assert ret is None
    expected = []
    for row in range(8):
        n = int(LENGTHS[row])
        expected += [float(SCORES[row]) - 0.1 * (n - t) for t in range(n)]  # plain loop: G_t
    assert torch.allclose(adv[MASK], whitened(expected), atol=1e-5)
    assert (adv[~MASK] == 0).all()


def test_reinforce_pp_baseline_takes_the_groups_mean_score_off_first():
    rewards = score_rewards() - 0.1 * MASK.float()
    adv, _ = run("reinforce_pp_baseline", rewards=rewards)
    group_means = [3.0] * 4 + [0.5] * 4  # mean score of each group
    expected = []
    for row in range(8):
        n = int(LENGTHS[row])
        expected += [float(SCORES[row]) - group_means[row] - 0.1 * (n - t) for t in range(n)]
    assert torch.allclose(adv[MASK], whitened(expected), atol=1e-5)


def test_returns_to_go_discount_and_helpers():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    # gamma 0.5: G_2 = 4; G_1 = 2 + 0.5 * 4 = 4; G_0 = 1 + 0.5 * 4 = 3; the masked 9 never counts
    assert torch.equal(returns_to_go(rewards, mask, 0.5), torch.tensor([[3.0, 4.0, 4.0, 0.0]]))
    assert torch.equal(sequence_returns(rewards, mask), torch.tensor([7.0]))
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    assert torch.equal(group_mean_baseline(r, 2), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(group_std(r, 2), torch.tensor([math.sqrt(2)] * 2 + [0.0] * 2))
    assert torch.equal(leave_one_out_baseline(r, 2), torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="does not split into groups of 3"):
        group_mean_baseline(r, 3)
    with pytest.raises(ValueError, match="at least 2 responses per prompt"):
        leave_one_out_baseline(r, 1)


def test_only_gae_needs_a_value_model():
    assert [n for n, e in ESTIMATORS.items() if e.needs_values] == ["gae"]
    assert {n: e.min_group_size for n, e in ESTIMATORS.items()} == {
        "gae": 1, "grpo": 2, "grpo_batch_std": 2, "dr_grpo": 2, "rloo": 2, "reinforce_pp": 1,
        "reinforce_pp_baseline": 2}


# ---- what the tests above could not see (issue 27) ----------------------------------------------------


def test_returns_to_go_counts_a_response_that_fills_every_column():
    # Real batches fill the last column with their longest response, whose score sits there.
    # gamma 1: G = [1 + 2 + 4, 2 + 4, 4] = [7, 6, 4]; a loop that stopped one column early would drop the 4.
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.equal(returns_to_go(rewards, torch.ones(1, 3, dtype=torch.bool), 1.0), torch.tensor([[7.0, 6.0, 4.0]]))


def test_a_group_whose_returns_tie_gets_zero_advantage_not_nan():
    # group 2 scores 1, 1: mean 1, std 0 -> (1 - 1) / (0 + eps) = 0 exactly, never 0/0
    # group 1 scores 0, 2: mean 1, std sqrt(2) -> -+1 / (sqrt(2) + 1e-6)
    rewards = torch.tensor([[0.0], [2.0], [1.0], [1.0]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    adv, _ = ESTIMATORS["grpo"](rewards, rewards[:, 0], mask, mask, None, 2)
    s = math.sqrt(2) + 1e-6
    assert torch.equal(adv[2:], torch.zeros(2, 1))
    assert torch.allclose(adv[:, 0], torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))


def test_grpo_batch_std_divides_by_the_std_of_the_whole_batch():
    # TRL's scale_rewards="batch": (R_i - mean_group) / std_batch. SCORES = 1, 2, 3, 6 | 0, 0, 1, 1:
    # batch mean 14/8 = 1.75; squared deviations 0.5625 + 0.0625 + 1.5625 + 18.0625 + 3.0625 x 2 + 0.5625 x 2
    # = 27.5, unbiased variance 27.5 / 7; deviations from the group means -2, -1, 0, 3 | -.5, -.5, .5, .5
    adv, ret = run("grpo_batch_std")
    std = math.sqrt(27.5 / 7 + 1e-8)
    expected = torch.tensor([-2.0, -1, 0, 3, -0.5, -0.5, 0.5, 0.5]) / std
    assert torch.allclose(per_sequence(adv), expected, atol=1e-6) and ret is None


def after_eos_layout(scores=SCORES, lengths=LENGTHS, t=T + 1):
    """The batch of the tests above as `stages.ppo` lays it out with `score_after_eos`: every row ended in
    EOS, the episode runs one position past it and the score sits there (the response tokens have none)."""
    response = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # (8, 6)
    episode = torch.arange(t).unsqueeze(0) < (lengths + 1).unsqueeze(1)  # one more position per row
    rewards = torch.zeros(response.shape)
    rewards[torch.arange(len(scores)), lengths] = scores
    return rewards, episode, response


@pytest.mark.parametrize("name", ["grpo", "grpo_batch_std", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_read_the_score_after_eos(name):
    # The score on the state after EOS (episode_mask) must count as much as a score on the EOS token
    # itself: at gamma 1 the advantages of the response tokens are the same, and 0 after EOS. An estimator
    # that summed or whitened over response_mask where episode_mask belongs would drop or dilute it.
    rewards, episode, response = after_eos_layout()
    adv, _ = ESTIMATORS[name](rewards, SCORES, episode, response, None, 4)
    on_eos, _ = run(name)
    assert torch.allclose(adv[:, :T][MASK], on_eos[MASK], atol=1e-6)
    assert (adv[~response] == 0).all()
    assert adv[response].abs().sum() > 1  # and not all zero


def whitened(values: list[float]) -> torch.Tensor:
    """(g - mean) / sqrt(var + 1e-8), the unbiased variance: `masked_whiten` by hand."""
    mean = sum(values) / len(values)
    var = sum((g - mean) ** 2 for g in values) / (len(values) - 1)
    return torch.tensor([(g - mean) / math.sqrt(var + 1e-8) for g in values])


def test_reinforce_pp_baseline_takes_the_mean_off_where_the_score_sits():
    # gamma 0.5, the score one position after EOS; its group's mean score comes off at the same position,
    # so every G_t = 0.5^(n - t) (score - mean): the baseline discounted like the score, not one step less.
    rewards, episode, response = after_eos_layout()
    adv, _ = ESTIMATORS["reinforce_pp_baseline"](rewards, SCORES, episode, response, None, 4, gamma=0.5)
    group_means = [3.0] * 4 + [0.5] * 4
    expected = [0.5 ** (int(LENGTHS[row]) - t) * (float(SCORES[row]) - group_means[row])
                for row in range(8) for t in range(int(LENGTHS[row]))]
    assert torch.allclose(adv[response], whitened(expected), atol=1e-5)


def test_reinforce_pp_baseline_subtracts_the_mean_score_not_the_mean_return():
    # Group 1 pays a KL penalty of 0.5 per token, group 2 none, so their mean returns differ from their
    # mean scores by different amounts (group 1: -0.5 x mean length 2.5 = -1.25), which no whitening
    # removes. G_t = score - group mean score - 0.5 x (tokens from t on) in group 1, score - mean in group 2.
    kl = torch.where(torch.arange(8).unsqueeze(1) < 4, 0.5, 0.0) * MASK.float()
    rewards = score_rewards() - kl
    adv, _ = run("reinforce_pp_baseline", rewards=rewards)
    group_means, penalty = [3.0] * 4 + [0.5] * 4, [0.5] * 4 + [0.0] * 4
    expected = [float(SCORES[row]) - group_means[row] - penalty[row] * (int(LENGTHS[row]) - t)
                for row in range(8) for t in range(int(LENGTHS[row]))]
    assert torch.allclose(adv[MASK], whitened(expected), atol=1e-5)
