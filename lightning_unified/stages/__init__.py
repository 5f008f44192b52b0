"""The batch pipeline: stages the module runs in a declared order on every training batch,
each adding named fields (:mod:`lightning_unified.batch`) before ``training_step``.

sample -> reference -> teacher -> rewards -> advantages -> preference -> importance, as a
method needs them (:func:`lightning_unified.pipeline.method_stages`); a stage of your own
goes before or after any of them (:class:`Stage`).
"""

from lightning_unified.stages.advantages import AdvantagesStage
from lightning_unified.stages.base import Stage
from lightning_unified.stages.importance import ImportanceStage
from lightning_unified.stages.order import BatchPipeline, PipelineError
from lightning_unified.stages.preference import PreferenceStage
from lightning_unified.stages.reference import ReferenceStage
from lightning_unified.stages.rewards import RewardsStage
from lightning_unified.stages.sample import SampleStage
from lightning_unified.stages.teacher import TeacherStage

__all__ = ["AdvantagesStage", "BatchPipeline", "ImportanceStage", "PipelineError", "PreferenceStage", "ReferenceStage",
           "RewardsStage", "SampleStage", "Stage", "TeacherStage"]
