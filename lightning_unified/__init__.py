"""lightning_unified: SFT, distillation, RL and on-policy distillation as one weighted loss.

:class:`UnifiedModule` is the LightningModule; a method is a ``data_source`` spec
(:class:`OffPolicy`, :class:`OnPolicy`) combined with a ``signal`` spec (:class:`Sparse`,
:class:`Dense`). The math underneath: :mod:`objective` is the one place where gradients
flow, :mod:`weights` holds the weight builders, :mod:`advantages` turns rewards into
advantages, :mod:`importance` forms ratios to the behaviour policy and :mod:`aggregation`
picks the loss normaliser.
"""

from lightning_unified.losses.aggregation import (
    AGGREGATIONS,
    LossCounts,
    all_reduce_counts,
    loss_counts,
    token_scale,
)
from lightning_unified.callbacks import (
    ImportanceCallback,
    RewardCallback,
    SamplingCallback,
    TeacherCallback,
)
from lightning_unified.module import UnifiedModule
from lightning_unified.losses.objective import (
    TeacherLogits,
    WeightedNLL,
    chunked_weighted_nll,
    target_logprobs,
    weighted_nll_from_logits,
)
from lightning_unified.specs import (
    Dense,
    Importance,
    OffPolicy,
    OnPolicy,
    Reward,
    Sampling,
    Sparse,
)
from lightning_unified.losses.token_weights import TokenWeights

__all__ = [
    "AGGREGATIONS",
    "Dense",
    "Importance",
    "ImportanceCallback",
    "LossCounts",
    "OffPolicy",
    "OnPolicy",
    "Reward",
    "RewardCallback",
    "Sampling",
    "SamplingCallback",
    "Sparse",
    "TeacherCallback",
    "TeacherLogits",
    "TokenWeights",
    "UnifiedModule",
    "WeightedNLL",
    "all_reduce_counts",
    "chunked_weighted_nll",
    "loss_counts",
    "target_logprobs",
    "token_scale",
    "weighted_nll_from_logits",
]
