"""The trainer's precision for work done outside ``training_step``.

Lightning runs ``training_step`` under its precision plugin (bf16 autocast under
``precision="bf16-mixed"``), but callbacks run outside it: a teacher's or a reference's
forward, and sampling, would silently run in float32. Each enters this context itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import lightning as L

from lightning_unified.lightning_private import attached_trainer


def trainer_precision(pl_module: L.LightningModule) -> AbstractContextManager:
    """The precision plugin's forward context (autocast, or nothing under 32-true); nothing
    when the module is not attached to a trainer (a direct call in a script or a test)."""
    trainer = attached_trainer(pl_module)
    if trainer is None:
        return nullcontext()
    return trainer.precision_plugin.forward_context()
