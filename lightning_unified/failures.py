"""Failed rows: a row the run cannot handle is data, not a crash.

An environment whose ``reset`` or ``step`` raises, a reward function that cannot score a
reply, a sampled reply that a teacher (or reference) with another tokenizer cannot encode:
each marks its row failed (``batch.FAILED``; an episode fails as a whole). A failed row is
out of the loss (:func:`lightning_unified.batch.loss_mask` is 0 on it, so no weight reaches
it and no normaliser counts it) and out of its group's advantages, and it is counted here:
``environment/failures``, ``rewards/failures``, ``teacher/unencodable`` and
``reference/unencodable`` per step, with the first traceback of each kind in the log.

A flaky row must not end a run that may be days old, but a broken service or a bug must
not train on for days either: each kind keeps its last ``window`` rows (episodes, for
environments), and once more than ``max_fraction * window`` of them failed the run stops
with :class:`TooManyFailedRows`, naming the kind, the count and the first error. Counts are
summed over ranks (one small all-reduce where a row can fail, none elsewhere), so every
rank takes the same decision at the same step.

What is not a failed row: a wrong type returned by user code (an environment's
``EnvironmentOutputError``, a reward of the wrong shape) is the code's error, raised at
once; so is off-policy data the teacher cannot encode (the data, not a sample, is wrong).
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from typing import NamedTuple

import torch

from lightning_unified import batch as fields
from lightning_unified.losses.aggregation import all_reduce_sum

log = logging.getLogger(__name__)

# each kind of failure and the metric that counts it per step
METRICS = {"environment": "environment/failures", "rewards": "rewards/failures", "teacher": "teacher/unencodable",
           "reference": "reference/unencodable"}


class RowFailure(NamedTuple):
    """One failed row: its index in the batch (its episode's, for environments), one line
    saying what failed, and the traceback for the log."""

    row: int
    what: str
    details: str = ""


def row_failure(row: int, what: str, error: BaseException) -> RowFailure:
    """``what`` (the row, the function or environment) with ``error``'s type, message and traceback."""
    return RowFailure(row, f"{what}: {type(error).__name__}: {error}",
                      "".join(traceback.format_exception(type(error), error, error.__traceback__)))


class TooManyFailedRows(RuntimeError):
    """More rows of one kind failed, among the most recent, than ``module.max_failure_fraction`` allows."""


class FailedRows:
    """Per kind, the rows seen and failed in each of the latest steps that cover the last
    ``window`` rows; the run stops once more than ``max_fraction`` of them failed, counted
    over at least ``window`` rows (0: at the first failure; 1: never). The window is judged
    as a whole from the start, so a few failures among the first rows do not stop a run,
    while a kind that fails on every row stops it after ``max_fraction * window`` rows; a
    step of more rows than the window (many ranks) is judged on its own rows."""

    def __init__(self, max_fraction: float = 0.1, window: int = 1000):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"module.max_failure_fraction must be in [0, 1], got {max_fraction}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"module.failure_window must be a whole number of rows >= 1, got {window!r}")
        self.max_fraction, self.window = float(max_fraction), window
        # (rows seen, rows failed) of each of the latest steps, over every rank
        self.recent: dict[str, deque] = {kind: deque() for kind in METRICS}
        self.totals = dict.fromkeys(METRICS, 0)  # every rank's failed rows since the start
        self.first: dict[str, str] = {}  # this rank's first failure of each kind, one line

    def record(self, kind: str, seen: int, failures: list) -> int:
        """``seen`` rows of ``kind`` on this rank, of which ``failures`` (each a
        :class:`RowFailure`, or its plain tuple) failed; every rank calls it at the same
        point. Logs this rank's first failure of the kind with its traceback, and returns
        the failed rows over every rank. Raises :class:`TooManyFailedRows` past the limit."""
        if kind not in METRICS:
            raise ValueError(f"failure kind must be one of {list(METRICS)}, got {kind!r}")
        failures = [RowFailure(*f) for f in failures]
        if failures and kind not in self.first:
            first = failures[0]
            self.first[kind] = first.what
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            log.error("rank %d: the first %s failure, row %d: %s. The row is left out of the loss and counted in %s "
                      "(later failures are only counted; the run stops past module.max_failure_fraction)\n%s", rank,
                      kind, first.row, first.what, METRICS[kind], first.details)
        failed = len(failures)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seen, failed = (int(v) for v in all_reduce_sum(torch.tensor([seen, failed], dtype=torch.float64)).tolist())
        self.totals[kind] += failed
        steps = self.recent[kind]
        steps.append((seen, failed))
        # the latest steps that still cover the window without the oldest: none is dropped
        # whose rows the window needs, and a step larger than the window stands alone
        while len(steps) > 1 and sum(rows for rows, _ in steps) - steps[0][0] >= self.window:
            steps.popleft()
        self._check(kind)
        return failed

    def _check(self, kind: str) -> None:
        rows = sum(seen for seen, _ in self.recent[kind])
        failed = sum(count for _, count in self.recent[kind])
        if failed > self.max_fraction * max(self.window, rows):
            first = self.first.get(kind, "on another rank: see its log")
            raise TooManyFailedRows(
                f"{failed} of the last {rows} {kind} rows failed ({METRICS[kind]}; "
                f"{self.totals[kind]} since the start), more than "
                f"module.max_failure_fraction={self.max_fraction:g} of module.failure_window={self.window} rows: "
                f"this is no longer a flaky row but a broken {_culprit(kind)}. The first failure: {first}")

    def state_dict(self) -> dict:
        return {"recent": {kind: list(rows) for kind, rows in self.recent.items()}, "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        for kind, steps in state.get("recent", {}).items():
            if kind in self.recent:
                self.recent[kind].clear()
                self.recent[kind].extend(tuple(step) for step in steps)
        self.totals.update({k: v for k, v in state.get("totals", {}).items() if k in self.totals})


def _culprit(kind: str) -> str:
    return {"environment": "environment (or its service)", "rewards": "reward function (or its service)",
            "teacher": "teacher tokenizer for these replies (set signal.unencodable_logp to score them instead)",
            "reference": "reference tokenizer for these replies (set reference.unencodable_logp to score them "
                         "instead)"}[kind]


def report(host, kind: str, seen: int, failures: list) -> None:
    """:meth:`FailedRows.record` on ``host.failures``, and the step's count logged."""
    failed = host.failures.record(kind, seen, failures)
    host.log(METRICS[kind], float(failed), batch_size=1)


def mark_failed(batch: dict, rows) -> None:
    """Rows ``rows`` (indices) of ``batch`` failed: ``batch.FAILED`` (made all False first
    where it is missing) is set on them."""
    response = batch[fields.RESPONSE_IDS]
    failed = batch.get(fields.FAILED)
    if failed is None:
        failed = torch.zeros(response.shape[0], dtype=torch.bool, device=response.device)
    failed = failed.clone()
    rows = list(rows)
    if rows:
        failed[torch.tensor(rows, device=failed.device)] = True
    batch[fields.FAILED] = failed
