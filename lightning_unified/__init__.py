"""lightning_unified: SFT, distillation, RL and on-policy distillation as one weighted loss.

:class:`UnifiedModule` is the LightningModule; a method is a ``data_source`` spec
(:class:`OffPolicy`, :class:`OnPolicy`) combined with a ``signal`` spec (:class:`Sparse`,
:class:`Dense`, :class:`Preference`), optionally with a :class:`Reference` KL penalty. The math underneath
lives in :mod:`lightning_unified.losses`: :mod:`~lightning_unified.losses.objective` is the
one place where gradients flow, :mod:`~lightning_unified.losses.weight_builders` holds the weight
builders. Models are in :mod:`lightning_unified.models`, data in
:mod:`lightning_unified.data`, rewards in :mod:`lightning_unified.rewards`, tasks in
:mod:`lightning_unified.tasks`, rollout engines (hf, vllm) in :mod:`lightning_unified.engines`.
"""

from lightning_unified.losses.aggregation import (
    AGGREGATIONS,
    LossCounts,
    all_reduce_counts,
    loss_counts,
    token_scale,
)
from lightning_unified.callbacks import NonFiniteGuard, RankFailureWatch, SampleLog
from lightning_unified.stages import (
    AdvantagesStage,
    BatchPipeline,
    ImportanceStage,
    PipelineError,
    PreferenceStage,
    ReferenceStage,
    RewardsStage,
    SampleStage,
    Stage,
    TeacherStage,
)
from lightning_unified.stages.host import PolicyHost, UpdateHook
from lightning_unified.engines import GenerationRequest, Rollout, RolloutEngine, build_engine
from lightning_unified.module import UnifiedModule
from lightning_unified.losses.objective import (
    TeacherLogits,
    WeightedNLL,
    chunked_weighted_nll,
    target_logprobs,
)
from lightning_unified.specs import (
    Dense,
    Importance,
    OffPolicy,
    OnPolicy,
    Preference,
    Reference,
    Reward,
    Sampling,
    Sparse,
)
from lightning_unified.losses.token_weights import TokenWeights

__all__ = [
    "AGGREGATIONS",
    "GenerationRequest",
    "PolicyHost",
    "Rollout",
    "RolloutEngine",
    "UpdateHook",
    "build_engine",
    "Dense",
    "Importance",
    "ImportanceStage",
    "NonFiniteGuard",
    "RankFailureWatch",
    "Reference",
    "ReferenceStage",
    "SampleLog",
    "LossCounts",
    "OffPolicy",
    "OnPolicy",
    "Preference",
    "PreferenceStage",
    "Reward",
    "RewardsStage",
    "AdvantagesStage",
    "Sampling",
    "SampleStage",
    "Stage",
    "BatchPipeline",
    "PipelineError",
    "Sparse",
    "TeacherStage",
    "TeacherLogits",
    "TokenWeights",
    "UnifiedModule",
    "WeightedNLL",
    "all_reduce_counts",
    "chunked_weighted_nll",
    "loss_counts",
    "target_logprobs",
    "token_scale",
]
