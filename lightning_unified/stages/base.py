"""A stage of the batch pipeline: what it reads of the batch, what it writes, and its work.

The module runs its stages in a declared order on every training batch (sample, reference,
teacher, rewards, advantages, preference, importance: whichever the method needs), before
``training_step``. Each stage says which fields (:mod:`lightning_unified.batch`) it needs
and which it adds, so a stage out of order is refused before training starts. Stages know
the module only through :class:`~lightning_unified.stages.host.PolicyHost`.

A stage of your own subclasses :class:`Stage`, names itself, declares its fields, and goes
``before`` or ``after`` a named stage::

    class Shaping(Stage):
        name = "shaping"

        def reads(self):
            return {fields.REWARDS, fields.RESPONSE_MASK}

        def writes(self):
            return {fields.REWARDS}

        def run(self, trainer, host, batch, batch_idx):
            batch[fields.REWARDS] = batch[fields.REWARDS] - 0.01 * batch[fields.RESPONSE_MASK].sum(-1)

    UnifiedModule(..., stages=[Shaping(before="advantages")])

or from the command line, ``'module.stages=[{_target_: mypkg.Shaping, before: advantages}]'``.
"""

from __future__ import annotations

from typing import Any


class Stage:
    """One job on each training batch. Every hook is optional; ``run`` is the one that
    adds fields. ``before`` / ``after`` place a stage of your own next to a named one."""

    #: the stage's name in the pipeline (what another stage goes before or after)
    name: str = "stage"

    def __init__(self, *, name: str | None = None, before: str | None = None, after: str | None = None):
        if name is not None:
            self.name = name
        if before is not None and after is not None:
            raise ValueError(f"stage {self.name!r} goes before {before!r} or after {after!r}, not both")
        self.before, self.after = before, after

    def reads(self) -> set[str]:
        """The fields this stage needs on every batch it runs on."""
        return set()

    def writes(self) -> set[str]:
        """The fields this stage may add (or replace)."""
        return set()

    # --- the run's course, called by the module ----------------------------------------
    def setup(self, trainer, host, stage: str) -> None:
        """Load what the stage needs (a teacher, a reference): at ``fit`` or ``validate``."""

    def on_fit_start(self, trainer, host) -> None:
        """The module is on its device: move the stage's models there."""

    def on_train_start(self, trainer, host) -> None:
        """Training starts (after a resumed run's checkpoint is restored)."""

    def run(self, trainer, host, batch: dict, batch_idx: int) -> None:
        """Add this stage's fields to ``batch``, before ``training_step``."""

    def on_update(self, trainer, host, batch: dict) -> None:
        """Before every optimizer step, on that step's rows (several per batch when a
        rollout is replayed): fields that must see the policy as it is at this very update."""

    def after_batch(self, trainer, host, outputs: Any, batch: dict, batch_idx: int) -> None:
        """After the batch's last update: diagnostics, and state that follows the policy."""

    def teardown(self, trainer, host, stage: str) -> None:
        """Release what :meth:`setup` took (a server connection, an engine)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this stage."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
