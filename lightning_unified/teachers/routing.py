"""Several teachers in one batch: which teacher scores each row (the data names it), and
the teachers' fields joined back into the batch's row order."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.losses.teacher_logits import RoutedTeacherLogits, TeacherLogits


def route_index(names: list[str], teachers: list[str], device: torch.device | str | None = None) -> Tensor:
    """[B] long: each row's teacher as its position in ``teachers``, from the row's teacher
    name; an unknown name is an error naming it and the teachers there are."""
    position = {name: i for i, name in enumerate(teachers)}
    unknown = sorted({n for n in names if n not in position})
    if unknown:
        raise ValueError(f"the data names teacher(s) {unknown}, which signal.teachers does not have; it has "
                         f"{teachers}")
    return torch.tensor([position[n] for n in names], dtype=torch.long, device=device)


def joined_rows(parts: list[tuple[Tensor, dict]], rows: int) -> dict:
    """One set of teacher fields for all ``rows`` rows, from teachers that each scored some
    rows: ``parts`` are (row index [B_g], {field: value with B_g rows}), every part with the
    same fields. Tensors are scattered into their rows; TeacherLogits become one
    RoutedTeacherLogits (each row read through its own teacher's head)."""
    if len(parts) == 1 and parts[0][0].numel() == rows:
        return parts[0][1]  # one teacher scored every row (row indices are sorted: in order)
    out = {}
    for name in parts[0][1]:
        values = [(index, part[name]) for index, part in parts]
        if isinstance(values[0][1], TeacherLogits):
            out[name] = RoutedTeacherLogits.from_rows(values, rows)
        else:
            first = values[0][1]
            joined = first.new_zeros(rows, *first.shape[1:])
            for index, value in values:
                joined[index] = value.to(joined.dtype)
            out[name] = joined
    return out
