"""The loss aggregation modes of rlhf.ppo.aggregation, against the minibatch loss written out with plain loops.

Golden values carry their arithmetic. The tests split a minibatch the ways a run does (micro-batches,
ranks whose gradients are averaged) and must fail on the mistakes peers made: a dropped 1/N, a mean per
micro-batch, padding counted in a denominator. Padding holds 1e6, so a mode that counted it would fail.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo.aggregation import AGGREGATIONS, aggregate


def plain_loss(loss, mask, mode, max_len):
    """The minibatch loss written out with Python loops over the real tokens only."""
    rows = [[float(loss[i, t]) for t in range(loss.shape[1]) if mask[i, t]] for i in range(loss.shape[0])]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "sequence_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_len)


@pytest.fixture
def minibatch():
    torch.manual_seed(1)
    loss = torch.randn(8, 6)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([1, 6, 2, 5, 3, 3, 4, 1]).unsqueeze(1)
    return torch.where(mask, loss, torch.tensor(1e6)), mask  # padding holds garbage that must never count


def split_sum(loss, mask, mode, parts, ranks, max_len=6):
    """The loss as a run sees it: `ranks` ranks (gradients averaged) x `parts` micro-batches each,
    every part with the whole minibatch's counts divided by the ranks."""
    counts = {"num_sequences": mask.shape[0] / ranks, "num_tokens": mask.sum() / ranks}
    per_rank = []
    for rank_rows in torch.arange(mask.shape[0]).chunk(ranks):
        per_rank.append(sum(aggregate(loss[idx], mask[idx], mode, max_len=max_len, **counts)
                            for idx in rank_rows.chunk(parts)))
    return sum(per_rank) / ranks  # what averaging the ranks' gradients amounts to


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
@pytest.mark.parametrize("parts,ranks", [(1, 1), (4, 1), (1, 2), (2, 2), (8, 1), (1, 4)])
def test_every_split_gives_the_whole_minibatch_loss(minibatch, mode, parts, ranks):
    loss, mask = minibatch
    expected = plain_loss(loss, mask, mode, max_len=6)
    assert split_sum(loss, mask, mode, parts, ranks) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_the_mistakes_peers_made_do_not_pass(minibatch, mode):
    loss, mask = minibatch
    expected = plain_loss(loss, mask, mode, max_len=6)
    # a dropped 1/N: every rank divides by the full counts, then gradients are averaged again
    dropped = sum(aggregate(loss[rows], mask[rows], mode, num_sequences=8, num_tokens=mask.sum(), max_len=6)
                  for rows in torch.arange(8).chunk(2)) / 2
    assert dropped != pytest.approx(expected, rel=1e-3)
    # a mean per micro-batch: each micro-batch normalised by its own counts, then averaged
    per_micro = sum(aggregate(loss[rows], mask[rows], mode, num_sequences=len(rows), num_tokens=mask[rows].sum(),
                              max_len=6) for rows in torch.arange(8).chunk(4)) / 4
    if mode == "token_mean":  # the others count sequences, which equal-sized micro-batches share alike
        assert per_micro != pytest.approx(expected, rel=1e-3)
    # padding in a denominator: counting every column as a token
    padded = aggregate(loss, torch.ones_like(mask), mode, num_sequences=8, num_tokens=mask.numel(), max_len=6)
    assert padded != pytest.approx(expected, rel=1e-3)


def test_sequence_sum_is_dr_grpos_constant_normaliser():
    loss = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # (1 + 2 + 4) / (2 sequences x max_len 3) = 7/6, whatever the lengths; sequence_mean: (1.5 + 4) / 2
    assert aggregate(loss, mask, "sequence_sum", num_sequences=2, num_tokens=3, max_len=3).item() == pytest.approx(7 / 6)
    assert aggregate(loss, mask, "sequence_mean", num_sequences=2, num_tokens=3, max_len=3).item() == pytest.approx(2.75)
    assert aggregate(loss, mask, "token_mean", num_sequences=2, num_tokens=3, max_len=3).item() == pytest.approx(7 / 3)


# ---- what the tests above could not see (issue 27) ----------------------------------------------------


def test_sequence_sum_divides_by_the_length_limit_not_the_padded_width():
    # A micro-batch trimmed to its longest response (3 columns) under max_new_tokens = 5:
    # (1 + 2 + 4) / (2 sequences x 5) = 0.7; the padded width would give 7/6
    loss = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(loss, mask, "sequence_sum", num_sequences=2, num_tokens=3, max_len=5).item() == pytest.approx(0.7)
