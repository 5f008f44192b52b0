"""Which weight builders a batch gets: the signal's registered one (a divergence, a
weighting of data tokens), the importance ratio's for sampled rows, plus the k3 penalty.

This is where a method is decided, and it never looks at a quadrant's name: a batch with
``advantages`` is pushed by rewards, a dense signal by its divergence in the form the
teacher gave it, a sampled batch (``sampled``) is corrected for its sampler. A new
divergence, advantage estimator or ratio is a function and its registration in
:mod:`lightning_unified.registry`; nothing here changes. The choice is made for every
update, after its per-update fields (:func:`lightning_unified.step.update_loss`): a stage or
callback may add there a field the choice reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

from lightning_unified import batch as fields
from lightning_unified.losses import weight_builders
from lightning_unified.losses.objective import WeightFn
from lightning_unified.losses.weight_sum import WeightSum
from lightning_unified.registry import DIVERGENCES, RATIOS, WEIGHTINGS
from lightning_unified.specs import Dense, Importance, Preference, Reference, Sparse

# the batch field each form of teacher signal arrives in
TEACHER_FIELD = {"top_k": fields.TEACHER_TOPK_IDS, "token_logp": fields.TEACHER_TOKEN_LOGP,
                 "distribution": fields.TEACHER, "spans": fields.SPAN_LOG_RATIO,
                 "span_top_k": fields.TEACHER_SPAN_TOPK_LOGP}


@dataclass(frozen=True)
class WeightBuilders:
    """The builders whose weights add up to a batch's (``weight_fn``), and the batch fields
    they read that a stage adds, each with what needs it (``needs``): checked on every
    update's rows, after the fields refreshed per update are in, so a missing stage is named
    rather than a builder silently falling back to another method."""

    weight_fn: WeightSum
    needs: tuple[tuple[str, str], ...] = ()


@cache
def _configured(builder: WeightFn, **settings) -> WeightFn:
    """One partial per (builder, settings), the same object every step: the compiled chunk
    math (``module.compile_loss``) guards on the function it traced, and a fresh partial per
    step would not match it."""
    return partial(builder, **settings)


def _with(builder: WeightFn, settings: dict) -> WeightFn:
    return _configured(builder, **settings) if settings else builder


def weight_builders_for(batch: dict, signal: Sparse | Dense | Preference, importance: Importance | None,
                        reference: Reference | None = None) -> WeightBuilders:
    """The signal's builder in the form this batch's fields call for, plus the k3 reference
    penalty when the reference scored the batch."""
    needs: list[tuple[str, str]] = []
    if isinstance(signal, Preference):
        main = weight_builders.preference
        needs += [(fields.PREFERENCE_WEIGHT, "signal=preference"), (fields.PREFERENCE_LOSS, "signal=preference")]
    elif isinstance(signal, Dense):
        divergence, gives = DIVERGENCES[signal.divergence], signal.teacher_gives
        needs.append((TEACHER_FIELD[gives], f"signal.divergence={signal.divergence!r} from the teacher's {gives}"))
        settings = {name: getattr(signal, name) for name in divergence.settings}
        if gives == "top_k":
            main = _configured(divergence.from_top_k, tail=signal.topk_tail)
        elif signal.across_tokenizers:  # the span fields of a teacher with its own tokenizer
            needs += [(name, f"signal.divergence={signal.divergence!r}") for name in divergence.batch_settings]
            main = _with(divergence.across, settings | {name: batch.get(name) for name in divergence.batch_settings})
        else:
            main = _with(divergence.builder, settings)
    elif fields.ADVANTAGES not in batch:
        # data tokens with reward 1: SFT, or a registered weighting of them (DFT's)
        main = WEIGHTINGS[signal.weighting].builder
    elif importance is None or not fields.is_sampled(batch):
        main = weight_builders.advantage_indicator
    else:
        ratio = RATIOS[importance.ratio]
        if ratio.proximal:
            needs.append((fields.PROXIMAL_LOGP, f"importance.ratio={importance.ratio} (the trainer's log-probs at the "
                                                f"batch's start)"))
        if importance.sequence_level:
            # the importance stage's sequence ratio; without it the builder would fall back to
            # token ratios and silently train another method
            needs.append((fields.LOG_RATIO, f"importance.ratio={importance.ratio} at the sequence level"))
        main = _with(*ratio.weights(importance))
    parts = [main]
    if reference is not None and reference.estimator == "k3" and fields.REFERENCE_LOGP in batch:
        parts.append(_configured(weight_builders.k3_reference_penalty, kl_coef=reference.kl_coef))
    return WeightBuilders(WeightSum(tuple(parts)), tuple(needs))
