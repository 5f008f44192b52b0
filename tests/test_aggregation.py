"""Loss normalisers use global counts, so any split into micro-batches gives the same gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import (AGGREGATIONS, LossCounts, count_tensor, loss_counts, normaliser,
                                                  normaliser_tensor, token_scale)
from lightning_unified.losses.objective import chunked_weighted_nll
from tests.conftest import make_problem


def _loss(p, rows, mode, counts):
    mask = p.mask[rows]
    scale = token_scale(mask, mode, global_counts=counts, constant=50.0)
    return chunked_weighted_nll(
        p.hidden[rows], p.head, p.targets[rows], scale, weight_builders.advantage_indicator,
        fields={"advantages": p.advantages[rows]}, chunk_size=3,
    ).loss


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_one_and_four_micro_batches_give_the_same_gradient(mode: str) -> None:
    p = make_problem(seed=20, batch=8)
    counts = loss_counts(p.mask)
    whole = torch.autograd.grad(_loss(p, slice(None), mode, counts), p.leaves())
    # four micro-batches of 1, 3, 2 and 2 sequences, with different token counts
    bounds = [(0, 1), (1, 4), (4, 6), (6, 8)]
    split = sum(_loss(p, slice(a, b), mode, counts) for a, b in bounds)
    parts = torch.autograd.grad(split, p.leaves())
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a per-micro-batch normaliser would not: the test can tell the difference
    if mode in ("token_mean", "seq_mean_token_mean"):
        local = sum(_loss(p, slice(a, b), mode, loss_counts(p.mask[a:b])) / 4 for a, b in bounds)
        local_grads = torch.autograd.grad(local, p.leaves())
        assert (local_grads[1] - whole[1]).abs().max() > 1e-6


def test_token_mean_is_cross_entropy_mean() -> None:
    p = make_problem(seed=21)
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(p.hidden, p.head, p.targets, scale, weight_builders.indicator)
    ce = F.cross_entropy(p.student_logits().reshape(-1, p.vocab), p.targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce)


def test_scales_and_counts() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert loss_counts(mask) == LossCounts(tokens=4.0, sequences=2.0, rows=3.0, groups=3.0)
    torch.testing.assert_close(token_scale(mask, "token_mean"), mask / 4.0)
    torch.testing.assert_close(token_scale(mask, "seq_mean_token_sum"), mask / 2.0)
    # the empty third response counts when asked (TRL's grpo loss counts it)
    torch.testing.assert_close(token_scale(mask, "seq_mean_token_sum", count_empty=True), mask / 3.0)
    torch.testing.assert_close(token_scale(mask, "seq_mean_token_mean", count_empty=True).sum(-1),
                               torch.tensor([1 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(token_scale(mask, "constant", constant=8.0), mask / 8.0)
    seq_mean = token_scale(mask, "seq_mean_token_mean")
    torch.testing.assert_close(seq_mean.sum(-1), torch.tensor([0.5, 0.5, 0.0]))  # each sequence weighs 1/2


def test_bad_aggregation_names_the_choices() -> None:
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="token_mean"):
        token_scale(mask, "mean")
    with pytest.raises(ValueError, match="constant > 0"):
        token_scale(mask, "constant")


def test_pair_mean_divides_by_the_pairs() -> None:
    """Two pairs (rows 0-1 and 2-3) of responses with 3, 1, 2 and 4 tokens: each token's
    term is divided by the number of pairs, whatever the lengths."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert loss_counts(mask, group_size=2) == LossCounts(tokens=10.0, sequences=4.0, rows=4.0, groups=2.0)
    torch.testing.assert_close(token_scale(mask, "pair_mean", group_size=2), mask / 2.0)
    with pytest.raises(ValueError, match="groups of 3"):
        loss_counts(mask, group_size=3)


@pytest.mark.parametrize("count_empty", [False, True])
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_the_device_normaliser_is_the_host_one(mode: str, count_empty: bool) -> None:
    """training_step scales a one-micro-batch step's loss by normaliser_tensor, the other
    path divides the gradient by normaliser: the two must agree, an empty row included."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    on_device = normaliser_tensor(mode, count_tensor(mask, group_size=2), count_empty=count_empty)
    assert on_device.item() == normaliser(mode, loss_counts(mask, group_size=2), count_empty=count_empty)
    empty = torch.zeros(2, 3, dtype=torch.long)  # nothing in the loss: 1, never a division by 0
    assert normaliser_tensor(mode, count_tensor(empty)).item() == normaliser(mode, loss_counts(empty)) >= 1.0


def test_a_failed_row_takes_its_group_out_of_the_pair_count() -> None:
    """Preference pairs normalise by the pairs in the step (pair_mean): a pair with a failed
    response has no margin and no loss, and is not counted either."""
    from lightning_unified.losses.aggregation import count_tensor

    mask = torch.ones(6, 3)
    failed = torch.tensor([False, True, False, False, False, False])
    tokens, sequences, rows, groups = count_tensor(mask * ~failed[:, None], 2, failed).tolist()
    assert (tokens, sequences, rows, groups) == (15.0, 5.0, 5.0, 2.0)
    assert count_tensor(mask, 2).tolist()[3] == 3.0
