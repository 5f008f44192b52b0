"""Scoring completions: the weighted sum of reward functions, each checked, and the decoded
text they read. Shared by training (the reward and preference callbacks) and validation."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_unified import batch as fields
from lightning_unified.failures import RowFailure, row_failure
from lightning_unified.specs import Reward

log = logging.getLogger(__name__)


def reward_name(reward: Reward) -> str:
    fn = getattr(reward.fn, "func", reward.fn)
    return getattr(fn, "__name__", type(fn).__name__)


def names_parameter(fn: Callable, name: str) -> bool:
    """Whether ``fn``'s signature names ``name`` (``**kwargs`` alone does not): inputs that
    cost work to make, such as the decoded prompts, go only to functions that ask for them."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no inspectable signature: give it everything
        return True


class Scores(NamedTuple):
    """What :func:`compute_rewards` gives: the weighted sum [B] (0 on a failed row), each
    function's mean over the rows it scored, and the rows some function could not score,
    each named once (:class:`~lightning_unified.failures.RowFailure`, in row order)."""

    total: Tensor
    parts: dict[str, Tensor]
    failed: list[RowFailure]
    # each function's [B] scores as it gave them (NaN where it raised; not weighted)
    values: dict[str, Tensor] = {}


def compute_rewards(rewards: list[Reward], **inputs) -> Scores:
    """The weighted sum of every reward function, [B], and each one's batch mean. A function
    is called on the whole batch; when that call raises, it is called again row by row, and
    only the rows it still cannot score fail, as do rows it scores NaN or infinite (a
    flaky service, a reply its parser cannot read: the row is left out, not the run ended).
    A function that returns the wrong shape is the code's error, raised at once."""
    size = len(inputs["completions"])
    total, parts, failed, values = torch.zeros(size), {}, {}, {}
    for reward in rewards:
        name = reward_name(reward)
        value, errors = _scores(reward.fn, name, inputs, size)
        for row in (~torch.isfinite(value)).nonzero().flatten().tolist():
            errors.setdefault(row, RowFailure(row, f"reward {name} on row {row}: returned {value[row].item()}"))
        for row, failure in errors.items():
            failed.setdefault(row, failure)
        scored = torch.isfinite(value)
        values[name] = value
        parts[name] = value[scored].mean() if scored.any() else torch.tensor(float("nan"))
        total = total + reward.weight * torch.where(scored, value, 0.0)
    total[sorted(failed)] = 0.0
    return Scores(total, parts, [failed[row] for row in sorted(failed)], values)


# the row-by-row retry of a batch call that raised stops after this many seconds, or twice
# the batch call's own, whichever is longer: a reward service that times out on the batch
# would otherwise be called once more per row (128 rows x a 30 s timeout is an hour, while the
# other ranks wait), and the rows not tried fail
RETRY_SECONDS = 10.0


def _scores(fn: Callable, name: str, inputs: dict, size: int) -> tuple[Tensor, dict[int, RowFailure]]:
    """``fn``'s [size] scores (NaN where it raised) and the rows it raised on: the whole
    batch at once, or, when that raises, row by row (within a time budget)."""
    started = time.monotonic()
    try:
        result = fn(**inputs)
    except Exception as error:  # noqa: BLE001 - which rows it cannot score is found row by row
        batch_error = error
    else:
        return _checked(result, name, size), {}
    budget = max(RETRY_SECONDS, 2 * (time.monotonic() - started))
    deadline = time.monotonic() + budget
    values, errors = torch.full((size,), float("nan")), {}
    for row in range(size):
        if time.monotonic() > deadline:
            errors[row] = row_failure(row, f"reward {name} on row {row}: not retried (the row-by-row retry of the "
                                           f"batch call ran past its {budget:.0f} s)", batch_error)
            continue
        try:
            result = fn(**{key: _row(value, row) for key, value in inputs.items()})
        except Exception as error:  # noqa: BLE001 - a row it cannot score fails, the run goes on
            errors[row] = row_failure(row, f"reward {name} on row {row}", error)
            continue
        values[row] = _checked(result, name, 1)[0]
    return values, errors


def _row(value, row: int):
    """Row ``row`` of one of a reward's inputs, as a batch of one."""
    return value[row:row + 1] if isinstance(value, (list, tuple, Tensor)) else value


def _checked(result, name: str, size: int) -> Tensor:
    value = torch.as_tensor(result, dtype=torch.float32).cpu()
    if value.shape != (size,):
        raise ValueError(
            f"reward {name} returned shape {tuple(value.shape)}; it must return one float per completion, "
            f"shape ({size},)"
        )
    return value


def decode_responses(tokenizer, batch: dict) -> list[str]:
    ids, mask = batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK]
    return tokenizer.batch_decode(torch.where(mask.bool(), ids, tokenizer.pad_token_id), skip_special_tokens=True)


def decode_prompts(tokenizer, batch: dict) -> list[str]:
    ids, mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
    return tokenizer.batch_decode(torch.where(mask.bool(), ids, tokenizer.pad_token_id), skip_special_tokens=True)


def score_each(rewards: dict[str, Callable], **inputs) -> dict[str, Tensor]:
    """{name: [B] scores} of each reward function on its own (validation's ``val/<name>``).
    A row a function cannot score is NaN, which the mean leaves out; the first such row of
    each call is logged with its traceback."""
    out = {}
    for name, fn in rewards.items():
        scores = compute_rewards([Reward(fn)], completion_ids=None, completion_mask=None, **inputs)
        if scores.failed:
            first = scores.failed[0]
            log.error("validation reward %r cannot score %d of %d answers, left out of val/%s; the first: %s\n%s",
                      name, len(scores.failed), len(inputs["completions"]), name, first.what, first.details)
        out[name] = scores.total.index_fill(0, torch.tensor([f.row for f in scores.failed], dtype=torch.long),
                                            float("nan"))
    return out
