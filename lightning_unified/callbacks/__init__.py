"""What crosses the training loop rather than one batch: the non-finite step guard, the
watch that stops every rank when one fails, the sample log, and the trainer's precision
for work outside ``training_step``. The batch's fields are added by the stages
(:mod:`lightning_unified.stages`)."""

from lightning_unified.callbacks.finite_guard import NonFiniteGuard
from lightning_unified.callbacks.rank_failure import RankFailureWatch
from lightning_unified.callbacks.samples import SampleLog

__all__ = ["NonFiniteGuard", "RankFailureWatch", "SampleLog"]
