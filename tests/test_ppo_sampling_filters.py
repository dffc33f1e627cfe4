"""Golden tests for rlhf.ppo.sampling_filters: DAPO's dynamic-sampling group filter."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import groups_with_signal

SCORES = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.25])


def test_groups_with_signal_hand_values():
    # K = 3: [1, 1, 1] all right, no signal; [0, 1, 0] mixed; [0, 0, 0] all wrong; [0.5, 0.5, 0.25] mixed
    assert groups_with_signal(SCORES, 3).tolist() == [False, True, False, True]
    # K = 2: (1, 1) (1, 0) (1, 0) (0, 0) (0, 0.5) (0.5, 0.25)
    assert groups_with_signal(SCORES, 2).tolist() == [False, True, True, False, True, True]
    # K = 12, one group with different scores: signal
    assert groups_with_signal(SCORES, 12).tolist() == [True]


def test_groups_of_one_have_no_signal():
    # A response is its own group's baseline: advantage r - mean(r) = 0 whatever it scored.
    assert groups_with_signal(torch.tensor([1.0, 0.0, 0.5]), 1).tolist() == [False, False, False]


@pytest.mark.parametrize(("scores", "group_size", "argument"), [
    (SCORES, 5, "group_size"),
    (SCORES, 0, "group_size"),
    (SCORES.view(3, 4), 2, "scores"),
])
def test_groups_with_signal_rejects_bad_arguments(scores, group_size, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        groups_with_signal(scores, group_size)
