"""What a run has trained on so far (tokens, seconds, optimizer steps), kept across a resume,
and the step clock behind ``train/tokens_per_sec``."""

from __future__ import annotations

import time


class TrainingProgress:
    def __init__(self) -> None:
        self.totals = {"tokens_seen": 0.0, "train_seconds": 0.0, "optimizer_steps": 0.0}
        self._last: float | None = None

    @property
    def running(self) -> bool:
        """True once training has started the clock."""
        return self._last is not None

    def start_clock(self) -> None:
        """From now (training starts, a validation ends): validation time is not training time."""
        self._last = time.perf_counter()

    def step(self, tokens: float) -> float:
        """Count one optimizer step of ``tokens``; returns its wall time since the previous
        step's end (or the clock's start), so loading, sampling and scoring count."""
        now = time.perf_counter()
        seconds = now - self._last if self._last is not None else 0.0
        self._last = now
        self.totals["tokens_seen"] += tokens
        self.totals["train_seconds"] += seconds
        return seconds

    def step_metrics(self, tokens: float) -> dict[str, float]:
        """Count one optimizer step (:meth:`step`) and return what to log of it: throughput
        (every rank's response tokens over the step's wall time) and the running totals."""
        seconds = self.step(tokens)
        metrics = {"train/tokens_seen": self.totals["tokens_seen"], "train/train_seconds": self.totals["train_seconds"]}
        if seconds > 0:
            metrics["train/tokens_per_sec"] = tokens / seconds
        return metrics
