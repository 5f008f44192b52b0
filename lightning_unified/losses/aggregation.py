"""How per-token terms become one loss: the normaliser, as an explicit choice.

The loss is ``sum_t token_scale_t * term_t``; :func:`token_scale` folds the padding mask
and the normaliser into one per-token factor. ``UnifiedModule`` uses :func:`token_terms` per
micro-batch: with one micro-batch a step it scales the loss by :func:`normaliser_tensor`
of the counts summed over ranks (on the device), with several it knows the normaliser only
once they have run and divides the summed gradient by :func:`normaliser` of the step's
global counts. The normaliser is always built from GLOBAL counts (over every micro-batch
of an optimizer step and every rank), passed in by the caller; :func:`all_reduce_counts`
sums them over ranks. Each micro-batch's loss is then a
share of one global sum, so summing the micro-batch gradients gives exactly the gradient of
the whole batch, however it is split. A per-micro-batch mean would weight a token of a
short micro-batch more than one of a long one.

Modes (names follow verl's ``agg_loss``):

- ``token_mean``: every token counts the same: ``1 / global_tokens``.
- ``seq_mean_token_mean``: every sequence counts the same, its tokens share its weight:
  ``1 / (len_i * global_sequences)`` (GRPO as published).
- ``seq_mean_token_sum``: ``1 / global_sequences``; longer sequences weigh more.
- ``constant``: ``1 / constant`` (Dr. GRPO: no length bias at all); ``constant`` is a
  fixed budget such as ``max_new_tokens * sequences_per_step``.
- ``pair_mean``: ``1 / global_groups``, a group being the rows that share a prompt (a
  preference pair): the mean over pairs of each pair's loss, as DPO, IPO and SimPO are
  defined. The preference signal's default; the step size does not depend on length.

A sequence with no token in the loss (an empty completion) is left out of the sequence
count unless ``count_empty`` is set, which counts every row (TRL's ``grpo`` loss does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "pair_mean")


class LossCounts(NamedTuple):
    """Token, sequence, row and group counts of a mask; sum them over micro-batches and ranks."""

    # tokens with mask 1
    tokens: float
    # sequences with at least one token with mask 1
    sequences: float
    # every row, empty or not (sequences with count_empty)
    rows: float = 0.0
    # groups of rows sharing a prompt (preference pairs)
    groups: float = 0.0


def loss_counts(mask: Tensor, group_size: int = 1) -> LossCounts:
    """Counts of the tokens, sequences, rows and groups of ``mask`` [B, T] (read back to the
    host: for tests and tools, not the step, which keeps :func:`count_tensor`)."""
    return LossCounts(*count_tensor(mask, group_size).tolist())


def count_tensor(mask: Tensor, group_size: int = 1, failed: Tensor | None = None) -> Tensor:
    """[4] float64 on ``mask``'s device: the tokens and the sequences of ``mask`` [B, T] that
    enter the loss, its rows, and its groups of ``group_size`` rows; never read back to the host.
    ``failed`` [B] bool: rows left out of the step, which the row count (``count_empty``) skips,
    and the group count too for a group with a failed row (a preference pair without one of
    its two responses has no margin)."""
    if group_size < 1 or mask.shape[0] % group_size:
        raise ValueError(f"{mask.shape[0]} rows do not split into groups of {group_size}")
    mask = mask.bool()
    rows, groups = (torch.full((1,), float(n), dtype=torch.float64, device=mask.device)  # a fill, not a copy
                    for n in (mask.shape[0], mask.shape[0] // group_size))
    if failed is not None:
        rows = rows - failed.sum().to(torch.float64)
        groups = groups - failed.reshape(-1, group_size).any(-1).sum().to(torch.float64)
    return torch.cat([torch.stack([mask.sum(), mask.any(-1).sum()]).to(torch.float64), rows, groups])


def all_reduce_sum(values: Tensor, group=None) -> Tensor:
    """``values`` summed over the ranks of ``group`` (every rank must call it), as float64 on
    the input's device; unchanged when torch.distributed is not initialised."""
    values = values.detach().to(torch.float64)  # float64 counts stay exact far beyond any batch
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    device = values.device
    if "nccl" in str(torch.distributed.get_backend(group)) and device.type != "cuda":
        values = values.cuda()  # NCCL reduces only CUDA tensors
    values = values.clone()
    torch.distributed.all_reduce(values, group=group)
    return values.to(device)


def all_reduce_max(values: Tensor, group=None) -> Tensor:
    """``values`` [n], the largest over the ranks of ``group`` (every rank must call it), as
    float64 on the input's device; unchanged when torch.distributed is not initialised."""
    values = values.detach().to(torch.float64)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    device = values.device
    if "nccl" in str(torch.distributed.get_backend(group)) and device.type != "cuda":
        values = values.cuda()
    values = values.clone()
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=group)
    return values.to(device)


def all_reduce_counts(counts: LossCounts, group=None) -> LossCounts:
    """Sum counts over the ranks of ``group`` (every rank must call it); the counts
    unchanged when torch.distributed is not initialised. One small all-reduce per step."""
    return LossCounts(*all_reduce_sum(torch.tensor(counts), group).tolist())


def _normalising_count(mode: str, count_empty: bool) -> int | None:
    """Which of :class:`LossCounts`' fields divides ``mode``'s summed terms; None: nothing
    (``constant`` is already in every token's term)."""
    if mode == "token_mean":
        return 0
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return 2 if count_empty else 1
    return 3 if mode == "pair_mean" else None


def normaliser(mode: str, counts: LossCounts, *, count_empty: bool = False) -> float:
    """What the summed per-token terms of a step are divided by, from its global counts.
    ``count_empty``: the sequence modes count every row, not only those with a loss token."""
    index = _normalising_count(mode, count_empty)
    return 1.0 if index is None else max(counts[index], 1.0)


def normaliser_tensor(mode: str, counts: Tensor, *, count_empty: bool = False) -> Tensor:
    """:func:`normaliser` of a :func:`count_tensor` [4], as a float64 scalar on its device:
    never read back to the host."""
    index = _normalising_count(mode, count_empty)
    return counts.new_ones(()) if index is None else counts[index].clamp_min(1.0)


def token_terms(mask: Tensor, mode: str, *, constant: float | None = None) -> Tensor:
    """Per-token factor [B, T] before the normaliser: ``mask`` (token_mean,
    seq_mean_token_sum, pair_mean), ``mask / len_i`` (seq_mean_token_mean) or ``mask / constant``."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    # float64 masks stay float64 (the gradient tests); bool/int masks become float32
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError(f"aggregation 'constant' needs constant > 0, got {constant}")
        return mask / constant
    if mode == "seq_mean_token_mean":
        return mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
    return mask


def token_scale(
    mask: Tensor,
    mode: str,
    *,
    global_counts: LossCounts | None = None,
    constant: float | None = None,
    group_size: int = 1,
    count_empty: bool = False,
) -> Tensor:
    """Per-token factor [B, T] = term / normaliser, for :mod:`lightning_unified.losses.objective`.

    ``global_counts`` default to this mask's own counts (one process, one micro-batch).
    """
    terms = token_terms(mask, mode, constant=constant)
    counts = global_counts if global_counts is not None else loss_counts(mask, group_size)
    return terms / normaliser(mode, counts, count_empty=count_empty)


class StepTotals(NamedTuple):
    """An optimizer step's sums over every micro-batch and rank, read back to the host once."""

    surrogate: float
    objective: float
    counts: LossCounts
    # each group's (objective, counts), in the order of its index (with ``groups``)
    groups: tuple[tuple[float, LossCounts], ...] = ()
    # the step's other diagnostics (lightning_unified.metrics.DeviceMetrics), reduced over ranks
    metrics: dict[str, float] = {}


class StepSums:
    """[surrogate, objective, tokens, sequences, rows, groups] summed over an optimizer step's micro-batches
    on this rank, kept on the device until :meth:`total` reads the whole step at once. With
    ``groups`` > 0 the objective and counts are also summed per group of rows (each row's
    teacher, with several), in the same one read."""

    def __init__(self, groups: int = 0) -> None:
        self.groups = groups
        self._sums: Tensor | None = None

    def add(self, loss: Tensor, objective: Tensor, mask: Tensor, group: Tensor | None = None,
            token_objective: Tensor | None = None, group_size: int = 1, counts: Tensor | None = None) -> None:
        """``group`` [B] long: each row's group; ``token_objective`` [B, T] its tokens'
        share of ``objective`` (both needed with ``groups``); ``group_size``: rows per prompt;
        ``counts``: ``count_tensor(mask, group_size)`` where the caller has it already."""
        counts = count_tensor(mask, group_size) if counts is None else counts
        sums = torch.cat([torch.stack([loss.detach().double(), objective.detach().double()]), counts.to(loss.device)])
        if self.groups:
            if group is None or token_objective is None:
                raise ValueError(f"StepSums(groups={self.groups}) needs each row's group and its tokens' objective")
            rows = torch.stack([token_objective.detach().double().sum(-1), mask.sum(-1).double(),
                                mask.bool().any(-1).double()], -1)  # [B, 3]
            per_group = rows.new_zeros(self.groups, 3).index_add_(0, group.to(rows.device), rows)
            sums = torch.cat([sums, per_group.reshape(-1).to(sums.device)])
        self._sums = sums if self._sums is None else self._sums + sums

    def total(self, metrics=None) -> StepTotals | None:
        """The step's sums over every rank (one all-reduce; every rank must call it), then
        cleared; None when nothing was added. Its ``tolist`` is the step's one read back to
        the host: the normaliser divides every gradient, and the constant normaliser's
        checks and the throughput are host arithmetic. ``metrics``: a
        :class:`~lightning_unified.metrics.DeviceMetrics` whose sums join the same
        all-reduce and whose maxima take one more (the largest over ranks), read in the same
        ``tolist``, then cleared."""
        names, sums, max_names, maxima = metrics.take() if metrics is not None else ([], None, [], None)
        if self._sums is None:
            return None
        reduced = all_reduce_sum(self._sums if sums is None else torch.cat([self._sums, sums.to(self._sums.device)]))
        if maxima is not None:
            reduced = torch.cat([reduced, all_reduce_max(maxima.to(reduced.device))])
        values = reduced.tolist()
        self._sums = None
        # the sums' share, then the maxima's (a smallest is kept as the largest of its negation)
        extra_sums = values[len(values) - len(names) - len(max_names):len(values) - len(max_names)]
        extra_maxima = values[len(values) - len(max_names):]
        values = values[:len(values) - len(names) - len(max_names)]
        reduced_metrics = {**dict(zip(names, extra_sums)),
                           **{name: sign * value for (name, sign), value in zip(max_names, extra_maxima)}}
        surrogate, objective = values[:2]
        groups = tuple((values[i], LossCounts(tokens=values[i + 1], sequences=values[i + 2]))
                       for i in range(6, len(values), 3))
        return StepTotals(surrogate, objective, LossCounts(*values[2:6]), groups, reduced_metrics)
