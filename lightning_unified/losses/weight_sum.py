"""Several weight builders as one: their weights added, each handed only the batch fields
its signature names (e.g. GRPO's advantage term plus a k3 penalty to a reference)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from lightning_unified.losses.token_weights import TokenWeights


@dataclass(frozen=True)
class WeightSum:
    """Several builders' weights added, e.g. GRPO's advantage term plus a k3 penalty.

    Each part receives only the fields its signature names, so parts with different
    inputs compose. A dataclass rather than a closure, so it pickles into spawned workers.
    """

    parts: tuple[Callable[..., TokenWeights], ...]
    # (required, optional) field names of each part, read from the signatures once here:
    # the call runs for every chunk, and under torch.compile it must not inspect anything
    part_fields: tuple[tuple[frozenset[str], frozenset[str]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("WeightSum needs at least one part")
        object.__setattr__(self, "part_fields", tuple(_field_names(part) for part in self.parts))

    def __call__(self, student_logp: Tensor, targets: Tensor, **fields: Tensor) -> TokenWeights:
        total = None
        for part, (required, optional) in zip(self.parts, self.part_fields):
            missing = required - fields.keys()
            if missing:
                raise KeyError(f"weight builder {_name(part)} needs fields {sorted(missing)}; got {sorted(fields)}")
            given = {k: fields[k] for k in (required | optional) & fields.keys()}
            weights = part(student_logp, targets, **given)
            total = weights if total is None else total + weights
        return total


def _name(fn: Callable) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", repr(fn))


def _field_names(fn: Callable) -> tuple[frozenset[str], frozenset[str]]:
    """The per-token fields a builder takes, (required, optional): its positional-or-keyword
    parameters after the first two. Keyword-only parameters are scalar settings."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    fields = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    required = frozenset(p.name for p in fields if p.default is inspect.Parameter.empty)
    return required, frozenset(p.name for p in fields) - required
