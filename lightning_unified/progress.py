"""What a run has trained on so far (tokens, seconds, optimizer steps), kept across a resume,
and the step clock behind ``train/tokens_per_sec``."""

from __future__ import annotations

import time

from lightning_unified.losses.aggregation import normaliser
from lightning_unified.metrics import derived, learning_rates


class TrainingProgress:
    def __init__(self) -> None:
        self.totals = {"tokens_seen": 0.0, "train_seconds": 0.0, "optimizer_steps": 0.0}
        self._last: float | None = None
        # tokens, seconds and model FLOPs since train/tokens_per_sec was last logged
        self._interval_tokens = self._interval_seconds = self._interval_flops = 0.0

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

    def step_metrics(self, tokens: float, write: bool, flops: float = 0.0, peak_flops: float | None = None
                     ) -> dict[str, float]:
        """Count one optimizer step (:meth:`step`); when ``write``, return what to log:
        throughput over the steps since the last write (every rank's response tokens over
        their wall time), the last step's response tokens, and the running totals; with
        ``peak_flops`` (every rank's together), ``train/mfu``: the trained forwards' and
        backwards' model ``flops`` over the same wall time (sampling, scoring and loading
        included, as Lightning's ``ThroughputMonitor`` times a step) over the peak. Lightning
        writes step metrics to its loggers every ``log_every_n_steps`` only, and each
        ``self.log`` call costs about a millisecond of host time, so the others log nothing."""
        seconds = self.step(tokens)
        self._interval_tokens += tokens
        self._interval_seconds += seconds
        self._interval_flops += flops
        if not write:
            return {}
        metrics = {"train/response_tokens": tokens, "train/tokens_seen": self.totals["tokens_seen"],
                   "train/train_seconds": self.totals["train_seconds"]}
        if self._interval_seconds > 0:
            metrics["train/tokens_per_sec"] = self._interval_tokens / self._interval_seconds
            if peak_flops:
                metrics["train/mfu"] = self._interval_flops / self._interval_seconds / peak_flops
        self._interval_tokens = self._interval_seconds = self._interval_flops = 0.0
        return metrics


def log_step(module, total, norm: float, write: bool, grad_scale: float = 1.0) -> None:
    """An optimizer step's loss and objective (each teacher's too, with several: the
    module's ``teacher_names``), normalised by the step's ``norm``, its progress, and its
    diagnostics (:mod:`lightning_unified.metrics`: the gradient norm, times ``grad_scale``,
    the factor the gradients get after the read; the learning rate; the entropy; lengths;
    rewards; MFU).

    Logged on the steps Lightning writes to its loggers (``write``: every
    ``log_every_n_steps``), where the logger and the progress bar read them: each ``log``
    costs Lightning about a millisecond of host time, 2% of a small model's step on a CPU,
    and the other steps' values would reach no logger."""
    if write:
        module.log("train/loss", total.surrogate / norm, prog_bar=True, batch_size=1)
        module.log("train/objective", total.objective / norm, batch_size=1)
        for name, (objective, counts) in zip(module.teacher_names, total.groups):
            if counts.sequences:  # a teacher none of this step's rows named has no objective
                module.log(f"train/objective/{name}", objective / normaliser(module.aggregation, counts), batch_size=1)
        for name, value in derived(total.metrics, total.counts.tokens, grad_scale).items():
            module.log(name, value, batch_size=1)
        for name, value in learning_rates(module.trainer.optimizers).items():
            module.log(name, value, batch_size=1)
    flops_model = getattr(module, "flops_model", None)
    flops = flops_model.step_flops(total.metrics) if flops_model is not None else 0.0
    for name, value in module.clock.step_metrics(total.counts.tokens, write=write, flops=flops,
                                                 peak_flops=None if flops_model is None else flops_model.peak).items():
        module.log(name, value, prog_bar=name == "train/tokens_per_sec", batch_size=1)
