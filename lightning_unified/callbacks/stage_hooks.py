"""The stages' end-of-batch work, called from the loop's callbacks rather than the module;
and the rollouts a failed run drops."""

from __future__ import annotations

import lightning as L
from typing_extensions import override


class StagesAfterBatch(L.Callback):
    """Calls each stage's ``after_batch`` (diagnostics, and state that follows the policy)
    when a training batch ends. A callback, not the module's own hook: Lightning calls every
    callback's ``on_train_batch_end``, the checkpoint callbacks last, before the module's, so
    a checkpoint written at this batch holds the stages' state as of this batch (a lagging
    self-teacher's weights, which a resumed run must continue from)."""

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        pipeline = getattr(pl_module, "pipeline", None)
        if pipeline is not None:
            pipeline.after_batch(trainer, pl_module, outputs, batch, batch_idx)


class CancelRolloutsOnFailure(L.Callback):
    """A run that fails drops the batches its producer has not sampled yet and stops the one
    it is sampling: nobody will train on them, and the process should not wait for them to
    exit. (Lightning calls ``on_exception`` on callbacks only, not on the module.)"""

    # seconds a failing run waits for the job being sampled to stop (a vLLM generate or an
    # environment's step does not poll the stop); past it, the daemon thread is left behind
    timeout = 10.0

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        rollouts = getattr(pl_module, "rollouts", None)
        if rollouts is not None:
            rollouts.cancel(self.timeout)
