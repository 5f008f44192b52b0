"""The learning-rate schedule's length: the steps Lightning will actually run, so a
schedule built for ``num_training_steps`` never outlives or undershoots the run."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import lightning as L

from lightning_unified.lightning_private import estimated_steps_without_loader


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
