"""Span-level sums for distillation across tokenizers: a span's log-probability under a
model is the sum of its tokens' (the spans come from
:func:`lightning_unified.data.alignment.align`), so the sampled reverse KL compares the two
models span by span, exactly. Pure functions on tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def span_ids(spans: list[tuple[int, int, int, int]], length: int) -> list[int]:
    """Each of a row's ``length`` student tokens' span (its index in ``spans``), -1 on tokens
    no span holds (padding)."""
    ids = [-1] * length
    for j, (s0, s1, _, _) in enumerate(spans):
        for t in range(s0, s1):
            ids[t] = j
    return ids


def span_log_ratio(student_logp: Tensor, teacher_span_logp: Tensor, span_id: Tensor) -> tuple[Tensor, Tensor]:
    """(r [B, R], share [B, R]): on each student token, its span's log-ratio ``r_j = log
    pi_T(span j) - log pi_theta(span j)``, and 1 / the span's student tokens (each token's
    share of the span's objective). ``student_logp`` [B, R]: log pi_theta of each student
    token (detached: the policy as it is at this update); ``teacher_span_logp`` [B, S]: the
    teacher's log-prob of each span (the sum over its own tokens); ``span_id`` [B, R] long,
    -1 outside every span. Both are 0 outside the spans."""
    inside = span_id >= 0
    index = span_id.clamp_min(0)  # [B, R]
    student_span = torch.zeros_like(teacher_span_logp).scatter_add_(
        1, index, torch.where(inside, student_logp.to(teacher_span_logp.dtype), 0.0))  # [B, S]
    tokens = torch.zeros_like(teacher_span_logp).scatter_add_(1, index, inside.to(teacher_span_logp.dtype))  # [B, S]
    ratio = (teacher_span_logp - student_span).gather(1, index)  # [B, R]
    share = tokens.clamp_min(1.0).reciprocal().gather(1, index)
    return torch.where(inside, ratio, 0.0), torch.where(inside, share, 0.0)
