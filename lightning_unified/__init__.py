"""lightning_unified: SFT, distillation, RL and on-policy distillation as one weighted loss.

The math layer: :mod:`objective` is the one place where gradients flow, :mod:`weights` holds
the weight builders, :mod:`advantages` turns rewards into advantages, :mod:`importance`
forms ratios to the behaviour policy and :mod:`aggregation` picks the loss normaliser.
"""

from lightning_unified.aggregation import AGGREGATIONS, LossCounts, all_reduce_counts, loss_counts, token_scale
from lightning_unified.objective import (
    TeacherLogits,
    WeightedNLL,
    chunked_weighted_nll,
    target_logprobs,
    weighted_nll_from_logits,
)
from lightning_unified.token_weights import TokenWeights

__all__ = [
    "AGGREGATIONS",
    "LossCounts",
    "TeacherLogits",
    "TokenWeights",
    "WeightedNLL",
    "all_reduce_counts",
    "chunked_weighted_nll",
    "loss_counts",
    "target_logprobs",
    "token_scale",
    "weighted_nll_from_logits",
]
