"""The one loss by plain autograd over full logits: the reference the chunked loss is checked
against. It holds the [tokens, vocab] logits the chunked path never materialises, so it is
test code only; the package trains through ``chunked_weighted_nll``."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.losses.chunk_math import WeightFn, chunk_weights
from lightning_unified.losses.objective import WeightedNLL
from lightning_unified.losses.teacher_logits import TeacherLogits, flatten_tokens
from lightning_unified.losses.token_weights import compute_dtype, log_softmax, weighted_log_likelihood


def weighted_nll_from_logits(
    logits: Tensor,
    targets: Tensor,
    token_scale: Tensor,
    weight_fn: WeightFn,
    *,
    fields: dict[str, Tensor] | None = None,
    teacher: TeacherLogits | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> WeightedNLL:
    """``-sum stopgrad(w) * log softmax(logits / T)[target] * token_scale`` from logits [..., V];
    ``chunk_size`` bounds only the weight builder's temporaries."""
    leading = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    scale = flatten_tokens("token_scale", token_scale, leading).detach()
    keep = (scale != 0).nonzero().squeeze(-1)
    kept_targets = flatten_tokens("targets", targets, leading).index_select(0, keep)
    kept_fields = {k: flatten_tokens(k, v, leading).detach().index_select(0, keep) for k, v in (fields or {}).items()}
    kept_teacher = None if teacher is None else teacher.flattened(leading).select(keep)
    kept_logits, kept_scale = flat_logits.index_select(0, keep), scale.index_select(0, keep)
    step = chunk_size or max(1, kept_logits.shape[0])
    acc = compute_dtype(kept_logits)
    loss, objective, kept_logp = kept_logits.new_zeros((), dtype=acc), kept_logits.new_zeros((), dtype=acc), []
    for start in range(0, kept_logits.shape[0], step):
        stop = min(start + step, kept_logits.shape[0])
        logp = log_softmax(kept_logits[start:stop], temperature, acc)  # [c, V]
        chunk_targets = kept_targets[start:stop]
        weights = chunk_weights(weight_fn, logp.detach(), chunk_targets, kept_scale[start:stop],
                                {k: v[start:stop] for k, v in kept_fields.items()},
                                None if kept_teacher is None else kept_teacher.log_probs(start, stop))
        loss = loss - weighted_log_likelihood(logp, chunk_targets, weights).sum()
        if weights.objective is not None:
            objective = objective + weights.objective.sum()
        kept_logp.append(logp.detach().gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1))
    kept = torch.cat(kept_logp) if kept_logp else loss.new_zeros(0)
    target_logp = kept.new_zeros(flat_logits.shape[0]).index_copy(0, keep, kept)
    return WeightedNLL(loss, objective.detach(), target_logp.reshape(leading))
