"""Step times of a training run for the benchmark scripts: the time between the ends of
consecutive training batches (sampling, teacher, forward, backward, optimizer), after the
first ``warmup`` steps."""

from __future__ import annotations

import time

import lightning as L


def fit_and_time_steps(run, warmup: int) -> list[float]:
    """Fit ``run`` (a :class:`lightning_unified.config.Run`) and return its step seconds."""
    ends: list[float] = []

    class StepEnds(L.Callback):
        def on_train_batch_end(self, *unused) -> None:
            ends.append(time.perf_counter())

    run.trainer.callbacks.append(StepEnds())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return [b - a for a, b in zip(ends, ends[1:])][warmup - 1:]
