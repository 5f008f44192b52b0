r"""A math reward that compares answers as expressions: the ``math-verify`` library (the
``math`` extra), as the open reasoning recipes score their completions.

Where :func:`~lightning_unified.rewards.text.numeric_answer` reads one number,
:func:`math_verify` parses the completion's answer (its last ``\boxed{}``, a ``$...$``
expression, or a plain number) and the reference into symbolic expressions and checks that
they are equal: fractions, decimals, LaTeX, radicals and algebra compare by value.

>>> math_verify(["The answer is 1/2.", r"so \boxed{\frac{1}{2}}", "It is $0.5$", "It is 3"],
...             ["0.5", "0.5", r"\frac{1}{2}", "1/2"]).tolist()
[1.0, 1.0, 1.0, 0.0]
>>> math_verify([r"\boxed{\frac{\sqrt2}{2}}", r"$\boxed{1+x}$"], [r"\sqrt{2}/2", "x+1"]).tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.rewards.text import _need_references


def _library():
    try:
        import math_verify as library
    except ImportError as error:
        raise ImportError(
            "reward math_verify needs the math-verify library: pip install -e '.[math]' "
            "(or pip install 'math-verify[antlr4_9_3]')"
        ) from error
    return library


def parse_reference(reference: str, library=None) -> list:
    """The reference parsed as math-verify parses a gold answer: as written (a number,
    ``\\boxed{}`` or ``$...$``), else as a bare LaTeX expression (``\\sqrt{2}/2``, ``x+1``).
    A reference that parses as neither is a clear error, never a silent zero."""
    library = library or _library()
    parsed = library.parse(reference) or library.parse(f"${reference}$")
    if not parsed:
        raise ValueError(f"reward math_verify: the reference {reference!r} holds no expression math-verify can parse")
    return parsed


def math_verify(completions: list[str], references: list[str], *, timeout_seconds: int | None = 5, **_) -> Tensor:
    r"""1.0 where the completion's answer equals the reference as an expression, else 0.0
    (also when the completion holds no answer). ``timeout_seconds`` bounds each parse and
    comparison (math-verify's own, by a signal: the main thread only; None turns it off).
    """
    library = _library()
    references = _need_references("math_verify", completions, references)
    scores = []
    for completion, reference in zip(completions, references):
        gold = parse_reference(reference, library)
        answer = library.parse(completion, parsing_timeout=timeout_seconds)
        scores.append(float(bool(answer) and library.verify(gold, answer, timeout_seconds=timeout_seconds)))
    return torch.tensor(scores)
