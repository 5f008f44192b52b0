"""Universal Logit Distillation (Boizard et al., 2024) and a GOLD-style hybrid: divergences
between distributions over two different vocabularies, each term with its derivative in
closed form (the weight builders in :mod:`lightning_unified.losses.weight_builders` turn those into
weights). Pure functions on tensors.

Both compare, at each span (:mod:`lightning_unified.data.alignment`), the probabilities of
the span's prefix followed by each token: ``m(v) = pi(prefix) * pi(v | context, prefix)``,
for the student over its vocabulary and for the teacher over its own (or its top-k).

- ULD: ``sum_k |sort(m_s)_k - sort(m_t)_k|``, both sorted in decreasing order, the shorter
  padded with zeros: no token needs a twin in the other vocabulary.
- Hybrid: tokens whose strings both vocabularies share are compared directly with the
  generalised JSD (``beta``; 0 is KL(teacher || student), 1 the reverse), the rest through
  ULD, the two parts weighted (GOLD's adaptive default: the shared share of the teacher's
  vocabulary). Probabilities enter the JSD's logarithms clamped at 1e-8, as in GOLD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CLAMP = 1e-8


@dataclass(frozen=True, eq=False)
class VocabularyMatch:
    """Which tokens two vocabularies share (the same string in both), for the hybrid:
    ``student_matched`` [V_s] bool; ``teacher_to_student`` [V_t] long, -1 where the teacher's
    token has no student twin; the weights of the matched and the unmatched parts."""

    student_matched: Tensor
    teacher_to_student: Tensor
    matched_weight: float
    unmatched_weight: float


def sorted_l1_terms(student_p: Tensor, teacher_p: Tensor, student_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(objective [n], d objective / d student_p [n, V]) of ``sum_k |s_(k) - t_(k)|``.

    ``student_p`` [n, V] and ``teacher_p`` [n, K] >= 0, each sorted in decreasing order here
    and padded with zeros to the longer; ``student_keep`` [V] bool: the student entries that
    take part (the rest are left out of the sort and get no gradient; the teacher's left-out
    entries are given as zeros)."""
    n, vocab = student_p.shape
    values = student_p if student_keep is None else torch.where(student_keep, student_p, -1.0)
    s_sorted, order = values.sort(-1, descending=True)  # [n, V]
    kept = vocab if student_keep is None else int(student_keep.sum())
    valid = torch.arange(vocab, device=student_p.device) < kept  # [V]
    s_sorted = torch.where(valid, s_sorted, 0.0)
    t_sorted = teacher_p.sort(-1, descending=True).values  # [n, K]
    width = max(vocab, t_sorted.shape[-1])
    s_full = torch.nn.functional.pad(s_sorted, (0, width - vocab))
    t_full = torch.nn.functional.pad(t_sorted, (0, width - t_sorted.shape[-1]))
    diff = s_full - t_full  # [n, W]
    grad_sorted = torch.where(valid, diff[:, :vocab].sign(), 0.0).to(student_p.dtype)  # [n, V]
    grad = torch.zeros_like(student_p).scatter_(-1, order, grad_sorted)
    return diff.abs().sum(-1), grad


def matched_jsd_terms(student_p: Tensor, teacher_p: Tensor, matched: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(objective [n], d objective / d student_p [n, V]) of the generalised JSD summed over
    the ``matched`` [V] entries, elementwise on unnormalised probabilities: ``teacher_p``
    [n, V] holds the teacher's probability of each student token's twin (0 without one)."""
    s = student_p.clamp_min(CLAMP)
    t = teacher_p.clamp_min(CLAMP)
    live = (student_p > CLAMP) & matched  # the clamp passes no gradient below it
    if beta == 0.0:  # KL(teacher || student)
        terms = t * (t.log() - s.log())
        grad = -t / s
    elif beta == 1.0:  # KL(student || teacher)
        terms = s * (s.log() - t.log())
        grad = s.log() - t.log() + 1.0
    else:
        mix = (1.0 - beta) * s + beta * t
        terms = beta * t * (t.log() - mix.log()) + (1.0 - beta) * s * (s.log() - mix.log())
        grad = (1.0 - beta) * (s.log() - mix.log())
    objective = torch.where(matched, terms, 0.0).sum(-1)
    return objective, torch.where(live, grad, 0.0)


def span_terms(student_logp: Tensor, teacher_ids: Tensor, teacher_logp: Tensor, match: VocabularyMatch | None = None,
               beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """(objective [n], d objective / d m [n, V]) at ``n`` span ends: ``student_logp`` [n, V] is
    log m_s (the student's log-probs there plus its prefix's), ``teacher_logp`` [n, K] log m_t
    of the teacher's top-k (``teacher_ids`` [n, K]: their student twins, -1 without one).
    Without ``match``: ULD; with it, the hybrid."""
    m = student_logp.exp()
    t = teacher_logp.exp().to(m.dtype)  # -inf (no entry) is 0
    if match is None:
        return sorted_l1_terms(m, t)
    matched = match.student_matched.to(m.device)
    vocab = m.shape[-1]
    if matched.numel() < vocab:  # the head's padding rows have no twin
        matched = torch.nn.functional.pad(matched, (0, vocab - matched.numel()))
    matched = matched[:vocab]
    has_twin = teacher_ids >= 0
    twin_p = torch.zeros_like(m).scatter_add_(-1, teacher_ids.clamp_min(0), torch.where(has_twin, t, 0.0).to(m.dtype))
    j_obj, j_grad = matched_jsd_terms(m, twin_p, matched, beta)
    u_obj, u_grad = sorted_l1_terms(m, torch.where(has_twin, 0.0, t).to(m.dtype), ~matched)
    return (match.matched_weight * j_obj + match.unmatched_weight * u_obj,
            match.matched_weight * j_grad + match.unmatched_weight * u_grad)
