"""The training progress bar in the run's optimizer steps (``step 5/20``), across epochs.

Lightning's bars count the batches of the running epoch and start again at every epoch;
its Rich bar titles them ``Epoch 0/-2`` when ``max_epochs`` is -1, which is how a run with
``trainer.max_steps`` loops over its data. A run here is as long as its steps, so the bar
counts those (``trainer.global_step``: with gradient accumulation, one per optimizer step),
out of the steps the run will make, and a resumed run's bar starts where it stopped.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, its training bar counting optimizer steps over the whole run."""

    TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    @property
    @override
    def train_description(self) -> str:
        return "step"

    @override
    def init_train_tqdm(self) -> Tqdm:
        total = self.trainer.estimated_stepping_batches  # training has started: counting builds nothing
        return Tqdm(desc=self.train_description, total=total if math.isfinite(total) else None,
                    initial=self.trainer.global_step,  # a resumed run's steps so far
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.TRAIN_FORMAT, unit=" steps")

    @override
    def on_train_epoch_start(self, trainer, *_) -> None:
        """No reset: the bar spans the run's epochs."""

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or step == bar.n or not self._should_update(step, bar.total or 0):
            return  # a micro-batch that did not step, or a step between refreshes
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


def step_progress_bar(trainer_config: Mapping, callbacks: Sequence) -> list:
    """``[StepProgressBar()]`` for a run's trainer, or nothing where the run shows no bar
    (``trainer.enable_progress_bar=false``) or the config brings a bar of its own."""
    if trainer_config.get("enable_progress_bar", True) is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [StepProgressBar()]
