"""The step's pipeline, one job per callback, each adding named fields to the batch in
``on_train_batch_start`` (see :mod:`lightning_unified.batch`), and the sample log."""

from lightning_unified.callbacks.finite_guard import NonFiniteGuard
from lightning_unified.callbacks.importance import ImportanceCallback
from lightning_unified.callbacks.preference import PreferenceCallback
from lightning_unified.callbacks.rank_failure import RankFailureWatch
from lightning_unified.callbacks.reference import ReferenceCallback
from lightning_unified.callbacks.reward import RewardCallback
from lightning_unified.callbacks.samples import SampleLog
from lightning_unified.callbacks.sampling import SamplingCallback
from lightning_unified.callbacks.teacher import TeacherCallback

__all__ = ["ImportanceCallback", "NonFiniteGuard", "PreferenceCallback", "RankFailureWatch", "ReferenceCallback", "RewardCallback", "SampleLog", "SamplingCallback",
           "TeacherCallback"]
