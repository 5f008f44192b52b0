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

import importlib

# each public name and the module that defines it, imported on first use: a process that
# needs one small part (a tool's worker, an alignment worker, ``python -m
# lightning_unified.rules``) does not load Lightning, the engines and every stage
_EXPORTS = {
    "AGGREGATIONS": "lightning_unified.losses.aggregation",
    "AdvantagesStage": "lightning_unified.stages",
    "BatchPipeline": "lightning_unified.stages",
    "Dense": "lightning_unified.specs",
    "GenerationRequest": "lightning_unified.engines",
    "Importance": "lightning_unified.specs",
    "ImportanceStage": "lightning_unified.stages",
    "LossCounts": "lightning_unified.losses.aggregation",
    "NonFiniteGuard": "lightning_unified.callbacks",
    "OffPolicy": "lightning_unified.specs",
    "OnPolicy": "lightning_unified.specs",
    "PipelineError": "lightning_unified.stages",
    "PolicyHost": "lightning_unified.stages.host",
    "Preference": "lightning_unified.specs",
    "RewardPairs": "lightning_unified.specs",
    "PreferenceStage": "lightning_unified.stages",
    "RankFailureWatch": "lightning_unified.callbacks",
    "Reference": "lightning_unified.specs",
    "ReferenceStage": "lightning_unified.stages",
    "Reward": "lightning_unified.specs",
    "RewardsStage": "lightning_unified.stages",
    "Rollout": "lightning_unified.engines",
    "RolloutEngine": "lightning_unified.engines",
    "SampleLog": "lightning_unified.callbacks",
    "SampleStage": "lightning_unified.stages",
    "Sampling": "lightning_unified.specs",
    "Sparse": "lightning_unified.specs",
    "Stage": "lightning_unified.stages",
    "TeacherLogits": "lightning_unified.losses.objective",
    "TeacherStage": "lightning_unified.stages",
    "TokenWeights": "lightning_unified.losses.token_weights",
    "UnifiedModule": "lightning_unified.module",
    "UpdateHook": "lightning_unified.stages.host",
    "WeightedNLL": "lightning_unified.losses.objective",
    "all_reduce_counts": "lightning_unified.losses.aggregation",
    "build_engine": "lightning_unified.engines",
    "chunked_weighted_nll": "lightning_unified.losses.objective",
    "loss_counts": "lightning_unified.losses.aggregation",
    "target_logprobs": "lightning_unified.losses.objective",
    "token_scale": "lightning_unified.losses.aggregation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_unified' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
