r"""Built-in rewards on decoded completions: plain functions, one float per completion.

Each takes the keyword arguments the reward callback passes (``completions``,
``references``, ``prompts``, ``completion_ids``, ``completion_mask``) and ignores the rest;
scalar settings (a pattern, a budget) are bound with ``functools.partial`` or Hydra's
``_partial_: true``.

>>> numeric_answer(["23 + 41 = 64", "It is \\boxed{63}."], ["64", "64"]).tolist()
[1.0, 0.0]
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _need_references(name: str, completions: list[str], references) -> list[str]:
    if references is None or any(r is None for r in references):
        raise ValueError(f"reward {name} compares with references, but the batch has none (give the task a "
                         f"'reference' column)")
    if len(references) != len(completions):
        raise ValueError(f"reward {name}: {len(completions)} completions but {len(references)} references")
    return [str(r) for r in references]


def exact_match(completions: list[str], references: list[str], **_) -> Tensor:
    """1.0 where the completion, stripped of surrounding white space, is the reference.

    >>> exact_match([" 052", "52"], ["052", "052"]).tolist()
    [1.0, 0.0]
    """
    references = _need_references("exact_match", completions, references)
    return torch.tensor([float(c.strip() == r.strip()) for c, r in zip(completions, references)])


def parse_number(text: str) -> float | None:
    r"""The answer a text gives as a number: the last ``\boxed{...}`` if there is one,
    else the last number in it; thousands separators are dropped. None if there is none.

    >>> parse_number("12 apples and 1,024 pears")
    1024.0
    >>> parse_number("\\boxed{7} (not 9)")
    7.0
    >>> parse_number("no digits") is None
    True
    """
    boxed = _BOXED.findall(text)
    candidates = _NUMBER.findall(boxed[-1] if boxed else text)
    for candidate in reversed(candidates):
        try:
            return float(candidate.replace(",", ""))
        except ValueError:
            continue
    return None


def numeric_answer(completions: list[str], references: list[str], *, tolerance: float = 1e-6, **_) -> Tensor:
    r"""1.0 where the completion's answer (the last ``\boxed{}`` number, else the last
    number) equals the reference's number, within ``tolerance``; 0.0 otherwise, also
    when the completion has no number.

    >>> numeric_answer(["The sum is 64.", "64 or 65", "sixty-four"], ["64", "64", "64"]).tolist()
    [1.0, 0.0, 0.0]
    """
    references = _need_references("numeric_answer", completions, references)
    scores = []
    for completion, reference in zip(completions, references):
        want, got = parse_number(reference), parse_number(completion)
        if want is None:
            raise ValueError(f"reward numeric_answer: the reference {reference!r} holds no number")
        scores.append(float(got is not None and abs(got - want) <= tolerance * max(1.0, abs(want))))
    return torch.tensor(scores)


def regex_format(completions: list[str], *, pattern: str, **_) -> Tensor:
    r"""1.0 where the whole completion (stripped) matches ``pattern``: a format reward,
    e.g. ``r"<think>.*</think>\s*<answer>.*</answer>"`` or ``r"-?\d+"``.

    >>> regex_format(["42", "about 42"], pattern=r"-?\d+").tolist()
    [1.0, 0.0]
    """
    compiled = re.compile(pattern, flags=re.DOTALL)
    return torch.tensor([float(compiled.fullmatch(c.strip()) is not None) for c in completions])


def length_penalty(completion_mask: Tensor, *, max_tokens: int, **_) -> Tensor:
    """-(response tokens / max_tokens): 0 for an empty response, -1 at the budget. Add it
    with a small weight to prefer short answers.

    >>> length_penalty(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), max_tokens=4).tolist()
    [-0.5, -1.0]
    """
    if max_tokens < 1:
        raise ValueError(f"reward length_penalty: max_tokens must be >= 1, got {max_tokens}")
    return -(completion_mask.sum(-1).float().cpu() / max_tokens)
