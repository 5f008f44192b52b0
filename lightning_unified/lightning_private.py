"""Every place this package reaches into Lightning's private state, and nowhere else.

Each function says what Lightning offers no public way to do, and was checked against
Lightning 2.6.6 (``lightning.pytorch``); a Lightning upgrade reads this file first.
Everything else in the package uses Lightning's public API only.
"""

from __future__ import annotations

import lightning as L

def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, or None (a module used in a script or a test).
    The public ``module.trainer`` raises when there is none; its private ``_trainer`` does
    not (2.6.6: ``LightningModule._trainer``)."""
    return getattr(module, "_trainer", None)


def writes_logs_now(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this step's metrics to its loggers (every
    ``log_every_n_steps`` steps, and when a run stops early): its logger connector's own
    test (2.6.6: ``trainer._logger_connector.should_update_logs``), so every step counts
    where it is missing. Each ``self.log`` costs about a millisecond of host time, so
    metrics that only a logger reads, or that change rarely, are logged on these steps alone."""
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else connector.should_update_logs


def estimated_steps_without_loader(trainer: L.Trainer) -> float:
    """``trainer.estimated_stepping_batches``, leaving the training loader unbuilt.

    To count the batches of an epoch, Lightning builds the training loader when asked, and
    a schedule asks while the optimizers are configured: before a resumed run's checkpoint
    is restored, so that loader would never get the checkpoint's place in the data, and the
    resumed run would start its epoch over in another order. Dropped, the fit loop builds it
    again after the restore and loads the place (2.6.6: ``fit_loop._combined_loader``)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    unbuilt = fit_loop is not None and fit_loop._combined_loader is None
    total = trainer.estimated_stepping_batches
    if unbuilt and fit_loop._combined_loader is not None:
        fit_loop._combined_loader = None
    return total


def evaluate_without_inference_mode(trainer: L.Trainer) -> None:
    """Validate under no_grad, not inference_mode: each evaluation loop's ``inference_mode``
    flag (2.6.6: set on the loop object; the Trainer's public ``inference_mode`` argument is
    fixed once the trainer is built, and the module cannot change it)."""
    for loop in (trainer.validate_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.test_loop, trainer.predict_loop):
        loop.inference_mode = False


class Lookahead:
    """The training loader's iterator, able to show the batches after the current one
    without taking them from the loop: :meth:`peek` pulls them early and keeps them, and
    the fit loop's next fetch gets the oldest kept one. ``kept``: batches to hand out
    before the loader's next (a resumed run's, pulled early before its checkpoint)."""

    def __init__(self, iterator, kept: list | None = None, length: int | None = None):
        self.iterator = iterator
        self.kept = list(kept or [])
        # the epoch's batches: a batch index past them is never pulled, so the loader is
        # never run into its end before Lightning itself reaches it
        self.length = length

    def __iter__(self):
        return self

    def __next__(self):
        return self.kept.pop(0) if self.kept else next(self.iterator)

    def peek(self, n: int):
        """The ``n``-th batch after the current one (1: the next), or None past the epoch's end."""
        while len(self.kept) < n:
            try:
                self.kept.append(next(self.iterator))
            except StopIteration:
                return None
        return self.kept[n - 1]


def training_lookahead(trainer: L.Trainer, kept: list | None = None) -> Lookahead:
    """The fit loop's training iterator as a :class:`Lookahead` (this epoch's; installed on
    first use). Lightning fetches each training batch with its data fetcher (2.6.6:
    ``fit_loop._data_fetcher``, whose ``iterator`` is the combined loader's, made again every
    epoch) and offers no public way to see later batches. Items are the combined loader's
    ``(batch, batch_idx, dataloader_idx)``, before any transfer to the device. Only a loader
    with a length is supported: for one without, the fetcher pulls a batch ahead itself."""
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or fetcher.iterator is None:
        raise RuntimeError("sampling.max_lag: the training loader is not being iterated")
    if isinstance(fetcher.iterator, Lookahead):
        return fetcher.iterator
    if fetcher.length is None:
        raise ValueError("sampling.max_lag >= 1 samples batches ahead of the trainer, which needs a training loader "
                         "with a length (a map-style dataset or a batch sampler with __len__); this one has none")
    fetcher.iterator = Lookahead(fetcher.iterator, kept, fetcher.length)
    return fetcher.iterator


def started_wandb_run(logger):
    """The W&B run a ``WandbLogger`` has started, or None: its public ``experiment`` starts
    one when there is none, and a run that logged nothing needs no end
    (2.6.6: ``WandbLogger._experiment``)."""
    return getattr(logger, "_experiment", None)
