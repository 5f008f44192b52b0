"""Every weight builder paired with an independent closed form of its objective.

The closed forms are written with torch.nn.functional and plain tensor algebra, not with
the library's code, so a test that compares their autograd gradients with the weighted
loss's gradient checks the weights, not the library against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from lightning_unified.losses.objective import TeacherLogits
from lightning_unified.losses import weight_builders
from lightning_unified.losses.weight_sum import WeightSum
from tests.conftest import Problem

TOPK = 4


def _logp_y(p: Problem, student_logp: torch.Tensor) -> torch.Tensor:
    return student_logp.gather(-1, p.safe_targets()[..., None])[..., 0]  # [B, T]


def _teacher_logp(p: Problem, temperature: float) -> torch.Tensor:
    return torch.log_softmax(p.teacher_logits() / temperature, -1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim, by F.kl_div (which takes the log of b first)."""
    return F.kl_div(logp_b, logp_a, log_target=True, reduction="none").sum(-1)


def topk_fields(p: Problem) -> dict[str, torch.Tensor]:
    values, ids = _teacher_logp(p, 1.0).topk(TOPK, dim=-1)
    return {"teacher_topk_ids": ids, "teacher_topk_logp": values}


def closed_topk_bucket(p: Problem, s: torch.Tensor) -> torch.Tensor:
    f = topk_fields(p)
    t_top = f["teacher_topk_logp"].exp()  # [B, T, K]
    s_top = s.gather(-1, f["teacher_topk_ids"]).exp()
    t_cat = torch.cat([t_top, 1 - t_top.sum(-1, keepdim=True)], -1)  # k + 1 categories
    s_cat = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    return (t_cat * (t_cat.log() - s_cat.log())).sum(-1)


def closed_topk_renormalize(p: Problem, s: torch.Tensor) -> torch.Tensor:
    f = topk_fields(p)
    q = torch.softmax(f["teacher_topk_logp"], -1)
    return (q * (q.log() - s.gather(-1, f["teacher_topk_ids"]))).sum(-1)


def closed_jsd(p: Problem, s: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    t = _teacher_logp(p, temperature)
    m = (beta * t.exp() + (1 - beta) * s.exp()).log()
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def closed_ppo(p: Problem, s: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    rho = (_logp_y(p, s) - p.behaviour_logp).exp()
    return -torch.min(rho * p.advantages, rho.clamp(1 - eps_low, 1 + eps_high) * p.advantages)


def closed_truncated_masked(p: Problem, s: torch.Tensor, truncate: float | None = None, mask_low: float | None = None,
                            mask_high: float | None = None, sequence: bool = False) -> torch.Tensor:
    """Truncated (TIS) and masked (MIS) importance sampling: the policy gradient weighted by
    stopgrad(min(rho, c)), tokens whose rho lies outside the band dropped; without
    truncation the ratio itself is differentiated (-rho A). ``sequence``: rho is each
    response's geometric-mean ratio (a constant, as the importance stage hands it over)."""
    logp = _logp_y(p, s)
    rho = sequence_ratio(p) if sequence else (logp - p.behaviour_logp).exp()
    kept = torch.ones_like(rho, dtype=torch.bool)
    if mask_low is not None:
        kept &= rho >= mask_low
    if mask_high is not None:
        kept &= rho <= mask_high
    if truncate is None and not sequence:
        return -torch.where(kept, rho, 0.0) * p.advantages
    weight = torch.where(kept, rho.clamp(max=truncate) if truncate is not None else rho, 0.0).detach()
    return -weight * (logp - logp.detach() + 1.0) * p.advantages  # the value -w A, the gradient -w A grad log pi


def sequence_ratio(p: Problem) -> torch.Tensor:
    """[B, T] each response's geometric-mean ratio pi / mu over its tokens, broadcast."""
    with torch.no_grad():
        logp = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
        mean = ((logp - p.behaviour_logp) * p.mask).sum(-1) / p.mask.sum(-1)
    return mean.exp()[:, None].expand_as(logp)


def proximal_logp(p: Problem) -> torch.Tensor:
    """[B, T] log pi_prox: neither the behaviour's nor the current policy's (fixed offsets)."""
    offsets = torch.cos(torch.arange(p.behaviour_logp.numel(), dtype=p.behaviour_logp.dtype))
    return p.behaviour_logp + 0.3 * offsets.reshape(p.behaviour_logp.shape)


def closed_decoupled(p: Problem, s: torch.Tensor, eps_low: float, eps_high: float, truncate: float,
                     mask_low: float | None = None, mask_high: float | None = None) -> torch.Tensor:
    """AReaL's decoupled PPO: -min(pi_prox / mu, c) min(rho A, clip(rho) A), rho = pi / pi_prox,
    tokens whose pi_prox / mu lies outside the band dropped."""
    prox = proximal_logp(p)
    u = (prox - p.behaviour_logp).exp()
    rho = (_logp_y(p, s) - prox).exp()
    surrogate = u.clamp(max=truncate) * torch.min(rho * p.advantages, rho.clamp(1 - eps_low, 1 + eps_high) * p.advantages)
    kept = torch.ones_like(u, dtype=torch.bool)
    if mask_low is not None:
        kept &= u >= mask_low
    if mask_high is not None:
        kept &= u <= mask_high
    return -torch.where(kept, surrogate, 0.0)


def closed_k3(p: Problem, s: torch.Tensor, kl_coef: float) -> torch.Tensor:
    log_r = p.reference_logp - _logp_y(p, s)
    return kl_coef * (log_r.exp() - log_r - 1)


def teacher_from_hidden(p: Problem, temperature: float = 1.0) -> TeacherLogits:
    return TeacherLogits(hidden=p.teacher_hidden, head_weight=p.teacher_head, temperature=temperature)


def teacher_from_logits(p: Problem, temperature: float = 1.0) -> TeacherLogits:
    return TeacherLogits(logits=p.teacher_logits(), temperature=temperature)


@dataclass
class Case:
    name: str
    weight_fn: Callable
    # closed-form per-token objective [B, T] from the student's log-probs [B, T, V]
    closed: Callable[[Problem, torch.Tensor], torch.Tensor]
    fields: Callable[[Problem], dict] = lambda p: {}
    teacher: Callable[[Problem], TeacherLogits | None] = lambda p: None
    temperature: float = 1.0


CASES = [
    Case("sft", weight_builders.indicator, lambda p, s: -_logp_y(p, s)),
    Case(
        "advantage",
        weight_builders.advantage_indicator,
        lambda p, s: -p.advantages * _logp_y(p, s),
        fields=lambda p: {"advantages": p.advantages},
    ),
    Case("dft", weight_builders.dft, lambda p, s: -_logp_y(p, s).exp()),
    Case(
        "importance_ratio",
        weight_builders.importance_weighted_advantage,
        lambda p, s: -(_logp_y(p, s) - p.behaviour_logp).exp() * p.advantages,
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp},
    ),
    Case(
        "ppo_clip",
        partial(weight_builders.ppo_clip, eps_low=0.2, eps_high=0.28),
        partial(closed_ppo, eps_low=0.2, eps_high=0.28),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp},
    ),
    Case(
        "decoupled_ppo_clip",
        partial(weight_builders.decoupled_ppo_clip, eps_low=0.2, eps_high=0.28, truncate=1.2),
        partial(closed_decoupled, eps_low=0.2, eps_high=0.28, truncate=1.2),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp,
                          "proximal_logp": proximal_logp(p)},
    ),
    Case(
        "decoupled_ppo_clip_masked",
        partial(weight_builders.decoupled_ppo_clip, eps_low=0.2, eps_high=0.28, truncate=1.2, mask_low=0.8, mask_high=1.25),
        partial(closed_decoupled, eps_low=0.2, eps_high=0.28, truncate=1.2, mask_low=0.8, mask_high=1.25),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp,
                          "proximal_logp": proximal_logp(p)},
    ),
    # the corrections of a lagged (or replayed) sample: TIS, MIS / IcePop, both, and both on
    # each response's geometric-mean ratio
    Case(
        "truncated_tis",
        partial(weight_builders.importance_weighted_advantage, truncate=1.2),
        partial(closed_truncated_masked, truncate=1.2),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp},
    ),
    Case(
        "masked_mis",
        partial(weight_builders.importance_weighted_advantage, mask_low=0.8, mask_high=1.25),
        partial(closed_truncated_masked, mask_low=0.8, mask_high=1.25),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp},
    ),
    Case(
        "truncated_and_masked",
        partial(weight_builders.importance_weighted_advantage, truncate=1.2, mask_low=0.8, mask_high=1.25),
        partial(closed_truncated_masked, truncate=1.2, mask_low=0.8, mask_high=1.25),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp},
    ),
    Case(
        "sequence_truncated_and_masked",
        partial(weight_builders.importance_weighted_advantage, truncate=1.1, mask_low=0.84, mask_high=1.25),
        partial(closed_truncated_masked, truncate=1.1, mask_low=0.84, mask_high=1.25, sequence=True),
        fields=lambda p: {"advantages": p.advantages, "behaviour_logp": p.behaviour_logp,
                          "log_ratio": sequence_ratio(p).log()},
    ),
    Case(
        "k3_reference",
        partial(weight_builders.k3_reference_penalty, kl_coef=0.5),
        partial(closed_k3, kl_coef=0.5),
        fields=lambda p: {"reference_logp": p.reference_logp},
    ),
    Case(
        "forward_kl",
        weight_builders.forward_kl,
        lambda p, s: _kl(_teacher_logp(p, 1.0), s),
        teacher=teacher_from_hidden,
    ),
    Case(
        "forward_kl_teacher_logits",
        weight_builders.forward_kl,
        lambda p, s: _kl(_teacher_logp(p, 1.0), s),
        teacher=teacher_from_logits,
    ),
    Case(
        "forward_kl_temperatures",
        weight_builders.forward_kl,
        lambda p, s: _kl(_teacher_logp(p, 2.0), s),
        teacher=partial(teacher_from_hidden, temperature=2.0),
        temperature=1.5,
    ),
    Case("forward_kl_topk_bucket", weight_builders.forward_kl_topk, closed_topk_bucket, fields=topk_fields),
    Case(
        "forward_kl_topk_renormalize",
        partial(weight_builders.forward_kl_topk, tail="renormalize"),
        closed_topk_renormalize,
        fields=topk_fields,
    ),
    Case("reverse_kl", weight_builders.reverse_kl, lambda p, s: _kl(s, _teacher_logp(p, 1.0)), teacher=teacher_from_hidden),
    Case(
        "reverse_kl_temperatures",
        weight_builders.reverse_kl,
        lambda p, s: _kl(s, _teacher_logp(p, 0.7)),
        teacher=partial(teacher_from_hidden, temperature=0.7),
        temperature=1.3,
    ),
    Case("jsd_0.3", partial(weight_builders.jsd, beta=0.3), partial(closed_jsd, beta=0.3), teacher=teacher_from_hidden),
    Case(
        "jsd_0.7_temperatures",
        partial(weight_builders.jsd, beta=0.7),
        partial(closed_jsd, beta=0.7, temperature=2.0),
        teacher=partial(teacher_from_hidden, temperature=2.0),
        temperature=0.8,
    ),
    Case(
        "advantage_plus_k3",
        WeightSum((weight_builders.advantage_indicator, partial(weight_builders.k3_reference_penalty, kl_coef=0.1))),
        lambda p, s: -p.advantages * _logp_y(p, s) + closed_k3(p, s, 0.1),
        fields=lambda p: {"advantages": p.advantages, "reference_logp": p.reference_logp},
    ),
]

CASE_IDS = [case.name for case in CASES]
