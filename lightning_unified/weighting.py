"""Which weight builder a batch gets: the signal's registered one (a divergence, a
weighting of data tokens), the importance ratio's for sampled rows, plus the k3 penalty.

This is where a method is decided, and it never looks at a quadrant's name: a batch with
``advantages`` is pushed by rewards, a dense signal by its divergence in the form the
teacher gave it, a sampled batch (``sampled``) is corrected for its sampler. A new
divergence, advantage estimator or ratio is a function and its registration in
:mod:`lightning_unified.registry`; nothing here changes.
"""

from __future__ import annotations

from functools import cache, partial

from lightning_unified import batch as fields
from lightning_unified.losses import weights
from lightning_unified.losses.objective import WeightFn
from lightning_unified.registry import DIVERGENCES, RATIOS, WEIGHTINGS
from lightning_unified.specs import Dense, Importance, Preference, Reference, Sparse


@cache
def _configured(builder: WeightFn, **settings) -> WeightFn:
    """One partial per (builder, settings), the same object every step: the compiled chunk
    math (``module.compile_loss``) guards on the function it traced, and a fresh partial per
    step would not match it."""
    return partial(builder, **settings)


def _with(builder: WeightFn, settings: dict) -> WeightFn:
    return _configured(builder, **settings) if settings else builder


def sparse_weight_fn(batch: dict, signal: Sparse, importance: Importance | None) -> WeightFn:
    if fields.ADVANTAGES not in batch:
        # data tokens with reward 1: SFT, or a registered weighting of them (DFT's)
        return WEIGHTINGS[signal.weighting].builder
    if not fields.is_sampled(batch) or importance is None:
        return weights.advantage_indicator
    if RATIOS[importance.ratio].proximal:
        fields.require(batch, fields.PROXIMAL_LOGP, who=f"importance.ratio={importance.ratio} (the trainer's "
                                                        f"log-probs at the batch's start)")
    if importance.sequence_level:
        # the importance stage's sequence ratio; without it the builder would fall back to
        # token ratios and silently train another method
        fields.require(batch, fields.LOG_RATIO, who=f"importance.ratio={importance.ratio} at the sequence level")
    return _with(*RATIOS[importance.ratio].weights(importance))


# the batch field each form of teacher signal arrives in
TEACHER_FIELD = {"top_k": fields.TEACHER_TOPK_IDS, "token_logp": fields.TEACHER_TOKEN_LOGP,
                 "distribution": fields.TEACHER, "spans": fields.SPAN_LOG_RATIO,
                 "span_top_k": fields.TEACHER_SPAN_TOPK_LOGP}


def dense_weight_fn(batch: dict, signal: Dense) -> WeightFn:
    divergence = DIVERGENCES[signal.divergence]
    gives = signal.teacher_gives
    fields.require(batch, TEACHER_FIELD[gives], who=f"signal.divergence={signal.divergence!r} from the teacher's {gives}")
    if gives == "top_k":
        return _configured(divergence.from_top_k, tail=signal.topk_tail)
    settings = {name: getattr(signal, name) for name in divergence.settings}
    if signal.across_tokenizers:  # the span fields of a teacher with its own tokenizer
        fields.require(batch, *divergence.batch_settings, who=f"signal.divergence={signal.divergence!r}")
        return _with(divergence.across, settings | {name: batch[name] for name in divergence.batch_settings})
    return _with(divergence.builder, settings)


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
