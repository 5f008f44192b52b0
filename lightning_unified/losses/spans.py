"""Span-level sums for distillation across tokenizers: a span's log-probability under a
model is the sum of its tokens' (the spans come from
:func:`lightning_unified.data.alignment.align`), so the sampled reverse KL compares the two
models span by span, exactly. Pure functions on tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.losses.objective import auto_chunk_size
from lightning_unified.losses.teacher_logits import TeacherLogits
from lightning_unified.losses.uld import span_terms


def span_ids(spans: list[tuple[int, int, int, int]], length: int, teacher: bool = False) -> list[int]:
    """Each of a row's ``length`` student tokens' span (its index in ``spans``), -1 on tokens
    no span holds (padding); ``teacher``: each of the teacher's tokens' instead."""
    ids = [-1] * length
    for j, span in enumerate(spans):
        start, stop = span[2:] if teacher else span[:2]
        ids[start:stop] = [j] * (stop - start)
    return ids


def span_ends(alignments) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row, student end, teacher first, teacher last) [n] long over every span of the rows'
    ``alignments`` (each with ``.spans``), in order: the span's row, its last student
    token, and its first and last teacher tokens."""
    rows = [(b, s1 - 1, t0, t1 - 1) for b, a in enumerate(alignments) for _, s1, t0, t1 in a.spans]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4).unbind(1)


def span_sums(values: Tensor, span_id: Tensor, spans: int | None = None) -> Tensor:
    """[B, S] each span's sum of ``values`` [B, T] over its tokens; ``span_id`` [B, T] long,
    -1 on tokens no span holds (left out). ``spans``: S (default T, enough for any row)."""
    out = values.new_zeros(values.shape[0], spans or values.shape[1])
    return out.scatter_add_(1, span_id.clamp_min(0), torch.where(span_id >= 0, values, 0.0))


def span_log_ratio(student_logp: Tensor, teacher_span_logp: Tensor, span_id: Tensor) -> tuple[Tensor, Tensor]:
    """(r [B, R], share [B, R]): on each student token, its span's log-ratio ``r_j = log
    pi_T(span j) - log pi_theta(span j)``, and 1 / the span's student tokens (each token's
    share of the span's objective). ``student_logp`` [B, R]: log pi_theta of each student
    token (detached: the policy as it is at this update); ``teacher_span_logp`` [B, S]: the
    teacher's log-prob of each span (the sum over its own tokens); ``span_id`` [B, R] long,
    -1 outside every span. Both are 0 outside the spans."""
    inside = span_id >= 0
    index = span_id.clamp_min(0)  # [B, R]
    spans = teacher_span_logp.shape[1]
    student_span = span_sums(student_logp.to(teacher_span_logp.dtype), span_id, spans)  # [B, S]
    tokens = span_sums(inside.to(teacher_span_logp.dtype), span_id, spans)  # [B, S]
    ratio = (teacher_span_logp - student_span).gather(1, index)  # [B, R]
    share = tokens.clamp_min(1.0).reciprocal().gather(1, index)
    return torch.where(inside, ratio, 0.0), torch.where(inside, share, 0.0)


def span_prefix_fields(token_logp: Tensor, end_logp: Tensor | TeacherLogits, span_id: Tensor, span_end: Tensor,
                       teacher_ids: Tensor, teacher_logp: Tensor, match=None, beta: float = 0.5, *,
                       chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(prefix [B, R], prefix_grad [B, R]) for ULD and the hybrid, from the policy as it is
    before an update: on each span's last token, the log-prob of the span's earlier tokens;
    on those earlier tokens, ``G = sum_v g(v) m(v)``, the span's objective's derivative with
    respect to that log-prob (:func:`lightning_unified.losses.uld.span_terms`).

    ``token_logp`` [B, R]: log pi_theta of each token (0 on padding); ``end_logp``: the
    policy's log-probs at the ``n`` span ends (``span_end`` [B, R] bool, row-major), [n, V],
    or its hidden states there with its head (a :class:`TeacherLogits`, which serves any
    frozen model) so that they exist a chunk at a time; ``teacher_ids``/``teacher_logp``
    [B, R, K]: the teacher's at each token, read at the ends. The vocabulary-sized terms
    (the sort of ``m`` among them) are computed ``chunk_size`` span ends at a time
    (default :func:`lightning_unified.losses.objective.auto_chunk_size`), as the loss
    chunks tokens: no [n, V] tensor exists."""
    inside = span_id >= 0
    index = span_id.clamp_min(0)
    dtype = torch.promote_types(token_logp.dtype, torch.float32)  # float32 at least: sums of many log-probs
    logp = token_logp.to(dtype)
    span_sum = span_sums(logp, span_id)  # [B, S<=R]
    prefix = torch.where(span_end, span_sum.gather(1, index) - logp, 0.0)  # [B, R]
    ends = span_end.flatten().nonzero().squeeze(-1)  # [n] row-major
    end_prefix = prefix.flatten().index_select(0, ends)  # [n]
    if chunk_size is None:
        if isinstance(end_logp, TeacherLogits) and end_logp.logits is None:
            vocab, hidden = end_logp.head_weight.shape
        else:  # log-probs that exist already: chunks bound only the terms' own temporaries
            given = end_logp if isinstance(end_logp, Tensor) else end_logp.logits
            vocab, hidden = given.shape[-1], 1
        chunk_size = auto_chunk_size(ends.numel(), vocab, hidden, end_prefix.device)
    teacher_ids, teacher_logp = teacher_ids.flatten(0, 1), teacher_logp.flatten(0, 1)  # [B * R, K]
    carried_at_end = end_prefix.new_empty(ends.numel())  # [n]: G at each span end
    for start in range(0, ends.numel(), chunk_size):
        stop = min(start + chunk_size, ends.numel())
        chunk_logp = end_logp.log_probs(start, stop) if isinstance(end_logp, TeacherLogits) else end_logp[start:stop]
        merged = chunk_logp.to(dtype) + end_prefix[start:stop, None]  # [c, V]
        at = ends[start:stop]
        _, grad = span_terms(merged, teacher_ids.index_select(0, at), teacher_logp.index_select(0, at), match, beta)
        carried_at_end[start:stop] = (grad * merged.exp()).sum(-1)
    carried = torch.zeros_like(span_sum)
    carried[span_end.nonzero(as_tuple=True)[0], span_id[span_end]] = carried_at_end
    return prefix, torch.where(inside & ~span_end, carried.gather(1, index), 0.0)
