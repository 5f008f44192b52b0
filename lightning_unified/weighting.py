"""Which weight builder a batch gets: chosen from the fields the pipeline added and the specs.

This is where a method is decided, and it never looks at a quadrant's name: a batch with
``advantages`` is pushed by rewards, one with teacher fields by the teacher, one with
``behaviour_logp`` is corrected for its sampler. A new method is a new builder in
:mod:`lightning_unified.losses.weights` and a line here.
"""

from __future__ import annotations

from functools import cache, partial

from lightning_unified import batch as fields
from lightning_unified.losses import weights
from lightning_unified.losses.objective import WeightFn
from lightning_unified.specs import Dense, Importance, Preference, Reference, Sparse


@cache
def _configured(builder: WeightFn, **settings) -> WeightFn:
    """One partial per (builder, settings), the same object every step: the compiled chunk
    math (``module.compile_loss``) guards on the function it traced, and a fresh partial per
    step would not match it."""
    return partial(builder, **settings)


def sparse_weight_fn(batch: dict, signal: Sparse, importance: Importance | None) -> WeightFn:
    if fields.ADVANTAGES not in batch:
        # data tokens with reward 1: SFT, or DFT's probability-scaled SFT
        return weights.dft if signal.weighting == "dft" else weights.indicator
    if not fields.is_sampled(batch) or importance is None or importance.ratio == "none":
        return weights.advantage_indicator
    band = {"mask_low": importance.mask_low, "mask_high": importance.mask_high} if importance.masks else {}
    if importance.sequence_level:
        # the importance callback's sequence ratio; without it the builder would fall back to
        # token ratios and silently train another method
        fields.require(batch, fields.LOG_RATIO, who=f"importance.ratio={importance.ratio} at the sequence level")
    if importance.ratio == "token":
        return _configured(weights.importance_weighted_advantage, **band) if band else weights.importance_weighted_advantage
    if importance.ratio == "truncated":
        return _configured(weights.importance_weighted_advantage, truncate=importance.truncate, **band)
    # ppo_clip, or sequence_clip (GSPO: ppo_clip on the LOG_RATIO field)
    return _configured(weights.ppo_clip, eps_low=importance.eps_low, eps_high=importance.eps_high, **band)


def dense_weight_fn(batch: dict, signal: Dense) -> WeightFn:
    if fields.TEACHER_TOPK_IDS in batch:
        return _configured(weights.forward_kl_topk, tail=signal.topk_tail)
    if fields.TEACHER_TOKEN_LOGP in batch:
        return weights.sampled_reverse_kl
    fields.require(batch, fields.TEACHER, who=f"signal.divergence={signal.divergence!r}")
    if signal.divergence == "forward_kl":
        return weights.forward_kl
    if signal.divergence == "reverse_kl":
        return weights.reverse_kl
    return _configured(weights.jsd, beta=signal.beta)


def preference_weight_fn(batch: dict) -> WeightFn:
    fields.require(batch, fields.PREFERENCE_WEIGHT, fields.PREFERENCE_LOSS, who="signal=preference")
    return weights.preference


def select_weight_fn(batch: dict, signal: Sparse | Dense | Preference, importance: Importance | None,
                     reference: Reference | None = None) -> tuple[WeightFn, ...]:
    """The builders whose weights add up to this batch's: the signal's, plus the k3
    reference penalty when the reference scored the batch."""
    if isinstance(signal, Preference):
        main = preference_weight_fn(batch)
    elif isinstance(signal, Dense):
        main = dense_weight_fn(batch, signal)
    else:
        main = sparse_weight_fn(batch, signal, importance)
    if reference is not None and reference.estimator == "k3" and fields.REFERENCE_LOGP in batch:
        return main, _configured(weights.k3_reference_penalty, kl_coef=reference.kl_coef)
    return (main,)


def builder_fields(batch: dict) -> dict:
    """The per-token fields a builder may take; the loss hands each builder those its
    signature names (see :class:`lightning_unified.losses.weights.WeightSum`)."""
    return {name: batch[name] for name in fields.PER_TOKEN_FIELDS if name in batch}
