"""The one owner of a run's rollouts (:class:`Rollouts`): the engine's life, the weights'
versions, the producer that samples ahead of the trainer with its stream and events, the
batches it holds, their checkpoint and their cancellation. The sample stage asks it for rows."""

from lightning_unified.rollouts.owner import Rollouts, close_all
from lightning_unified.rollouts.producer import CancelledRollout, RolloutProducer

__all__ = ["CancelledRollout", "RolloutProducer", "Rollouts", "close_all"]
