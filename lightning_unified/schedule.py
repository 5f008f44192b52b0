"""The run's length in optimizer steps: what the learning-rate schedule, the run's first line
and the progress bar count, so a schedule built for ``num_training_steps`` never outlives or
undershoots the run. ``trainer.max_steps`` > 0 is the run's length whatever the epochs (as in
the Hugging Face Trainer and TRL): the data loops as often as the steps take."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import lightning as L
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_unified.lightning_private import estimated_steps_without_loader


def epochs_for(max_steps: int | None, max_epochs: int | None) -> int | None:
    """The ``max_epochs`` a Trainer gets for ``trainer.max_steps``: -1 (as many passes as the
    steps take) when ``max_steps`` > 0, else the configured ``max_epochs``. Lightning stops at
    whichever limit comes first, so ``max_steps=20`` on 16 batches with its default one epoch
    would stop after 16, while the Hugging Face Trainer and TRL let ``max_steps`` override the
    number of epochs."""
    return -1 if isinstance(max_steps, int) and max_steps > 0 else max_epochs


def planned_steps(trainer: L.Trainer, datamodule: L.LightningDataModule | None = None) -> int | None:
    """The optimizer steps a fit of ``trainer`` will make, before the fit (the run's first
    line): ``max_steps``, or ``max_epochs`` x the batches of an epoch over
    ``accumulate_grad_batches`` (rounded up: Lightning steps on an epoch's last batch), as
    Lightning counts them for the schedule. None when an epoch's batches cannot be counted
    (a loader without a length)."""
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_epochs == -1 or (max_steps > 0 and datamodule is None):
        return max_steps if max_steps > 0 else None
    batches = epoch_batches(trainer, datamodule)
    if batches is None:
        return max_steps if max_steps > 0 else None
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(max_epochs or 1, 1)
    return min(steps, max_steps) if max_steps > 0 else steps


def epoch_batches(trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> int | None:
    """The training batches of one epoch on each rank, from a loader built only to be counted
    (the datamodule sees ``trainer``, for its ranks), within ``trainer.limit_train_batches``."""
    if datamodule is None:
        return None
    before = datamodule.trainer
    datamodule.trainer = trainer
    try:
        batches = len(datamodule.train_dataloader())
    except TypeError:  # an iterable dataset: no length
        return None
    finally:
        datamodule.trainer = before
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * limit) if limit is not None else batches


def training_steps(trainer: L.Trainer) -> int:
    """Optimizer steps (training batches, with several updates per rollout) this fit will
    run: ``trainer.max_steps``, or ``max_epochs`` x batches per epoch when that is sooner."""
    # the training loader stays unbuilt: a resumed run's must be built after its restore
    total = estimated_steps_without_loader(trainer)
    if not math.isfinite(total):
        raise ValueError(
            f"trainer.max_steps={trainer.max_steps} with trainer.max_epochs={trainer.max_epochs} trains without end, "
            f"so the learning-rate schedule has no length: set trainer.max_steps (or trainer.max_epochs)"
        )
    if total < 1:
        raise ValueError(f"this run would make {total} optimizer steps (trainer.max_steps={trainer.max_steps}, "
                         f"trainer.max_epochs={trainer.max_epochs}): nothing to train")
    return int(total)


def build_scheduler(factory: Callable, optimizer, trainer: L.Trainer):
    """``factory(optimizer)``, handing it ``num_training_steps`` when it takes one that the
    config left out (transformers' schedules do); one the config set is checked instead."""
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    if "num_training_steps" in bound and bound["num_training_steps"] is None and _fills_defaults(factory):
        # LightningCLI binds every argument, the unset length as None: the run's steps
        return factory(optimizer, num_training_steps=training_steps(trainer))
    if "num_training_steps" in bound:
        if bound["num_training_steps"] is None or bound["num_training_steps"] < 1:
            raise ValueError(f"scheduler.num_training_steps={bound['num_training_steps']} must be a number of steps >= 1; "
                             f"leave it out to use the steps this run will make")
        return factory(optimizer)
    try:
        takes_length = "num_training_steps" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature
        takes_length = False
    if takes_length:
        return factory(optimizer, num_training_steps=training_steps(trainer))
    return factory(optimizer)


def _fills_defaults(factory: functools.partial) -> bool:
    """Whether ``factory`` is jsonargparse's (LightningCLI's) partial of a class, which binds
    every argument the YAML file left out to its default."""
    return getattr(factory.func, "__module__", "").startswith("jsonargparse")


class TransformersSchedule(LambdaLR):
    """One of transformers' learning-rate schedules by ``name`` (``get_scheduler``'s: linear,
    cosine, constant_with_warmup, ...), as a class: what a LightningCLI YAML file names
    (jsonargparse builds an optimizer's schedule from a class, not a function).
    ``num_training_steps`` left out is the run's steps (:func:`build_scheduler`); the same
    rates as ``transformers.get_<name>_schedule...`` from Hydra's ``conf/scheduler``."""

    def __init__(self, optimizer: Optimizer, name: str = "cosine", num_warmup_steps: int = 0,
                 num_training_steps: int | None = None):
        from transformers import get_scheduler

        made = get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
        if not isinstance(made, LambdaLR):  # reduce_lr_on_plateau: stepped by a metric, not every step
            raise ValueError(f"TransformersSchedule name={name!r} is not a per-step schedule (transformers gives a "
                             f"{type(made).__name__}); name one of linear, cosine, cosine_with_restarts, polynomial, "
                             f"constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay")
        super().__init__(optimizer, made.lr_lambdas)


def configure_optimization(policy, optimizer_factory: Callable, scheduler_factory: Callable | None,
                           trainer: L.Trainer):
    """What ``configure_optimizers`` returns: the optimizer over the trainable parameters
    only (with LoRA, the adapters; frozen ones never reach it), and the scheduler stepped
    every optimizer step, as long as this run, unless the config sets its length."""
    optimizer = optimizer_factory([p for p in policy.parameters() if p.requires_grad])
    if scheduler_factory is None:
        return optimizer
    scheduler = build_scheduler(scheduler_factory, optimizer, trainer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
