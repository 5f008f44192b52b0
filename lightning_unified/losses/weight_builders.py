"""Weight builders: one pure function per row of DESIGN.md's table of weights.

Each builder is called per chunk of ``c`` tokens as
``builder(student_logp [c, V], targets [c], **fields) -> TokenWeights`` where
``student_logp`` is the detached log pi_theta and ``fields`` are per-token tensors (teacher
log-probs, advantages, behaviour log-probs ...) sliced to the chunk. Scalar settings are
keyword arguments, bound with ``functools.partial`` (picklable, unlike a lambda).

Every builder also reports the real objective per token, whose gradient the weights
reproduce: the tests check each pair against autograd of an independent closed form.
A new signal is a new function (here, or in your own module) and its registration in
:mod:`lightning_unified.registry`, which says what it needs from the teacher; nothing
else changes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_unified.losses.importance import (
    ppo_clip_active,
    ratio_from_log,
    token_log_ratio,
    truncated_ratio,
)
from lightning_unified.losses.uld import span_terms
from lightning_unified.losses.token_weights import TokenWeights


def _gather(logp: Tensor, targets: Tensor) -> Tensor:
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [c]


def _ratio(student_logp: Tensor, targets: Tensor, behaviour_logp: Tensor, log_ratio: Tensor | None) -> Tensor:
    """rho_t [c] from the token-level log ratio, or from a precomputed (sequence-level) one."""
    if log_ratio is None:
        log_ratio = token_log_ratio(_gather(student_logp, targets), behaviour_logp)
    return ratio_from_log(log_ratio.to(student_logp.dtype))


def _kl_terms(logp_p: Tensor, logp_q: Tensor, p: Tensor | None = None) -> Tensor:
    """sum_v p(v) (log p(v) - log q(v)) per row, [c]; a zero p(v) adds 0, never 0 * inf.

    ``p`` is exp(logp_p) when the caller has it already: every pass over [c, V] costs.
    """
    if p is None:
        p = logp_p.exp()
    # where p = 0, log p = -inf makes the difference -inf or nan: set it to 0; an infinite
    # KL (p > 0 where q = 0) keeps its +inf
    diff = (logp_p - logp_q).nan_to_num_(nan=0.0, neginf=0.0, posinf=float("inf"))
    return torch.linalg.vecdot(p, diff)


# --- sparse: weight on the batch token --------------------------------------------------


def indicator(student_logp: Tensor, targets: Tensor) -> TokenWeights:
    """SFT: w = 1[v = y_t]; the objective is cross-entropy."""
    return TokenWeights(coef=torch.ones_like(targets, dtype=student_logp.dtype), objective=-_gather(student_logp, targets))


def advantage_indicator(student_logp: Tensor, targets: Tensor, advantages: Tensor) -> TokenWeights:
    """On-policy RL (REINFORCE, RLOO, GRPO) and reward-weighted SFT: w = A_t * 1[v = y_t]."""
    advantages = advantages.to(student_logp.dtype)
    return TokenWeights(coef=advantages, objective=-advantages * _gather(student_logp, targets))


def dft(student_logp: Tensor, targets: Tensor) -> TokenWeights:
    """DFT ("On the Generalization of SFT"): w = stopgrad(pi_theta(y_t)) * 1[v = y_t].

    Its objective is -pi_theta(y_t): SFT's gradient rescaled by the token's probability,
    which stops rare tokens from dominating the update.
    """
    p = _gather(student_logp, targets).exp()
    return TokenWeights(coef=p, objective=-p)


def _outside_band(rho: Tensor, mask_low: float | None, mask_high: float | None) -> Tensor | None:
    """Where the ratio lies outside [mask_low, mask_high], bool [c] (None: no band)."""
    if mask_low is None and mask_high is None:
        return None
    outside = torch.zeros_like(rho, dtype=torch.bool)
    if mask_low is not None:
        outside |= rho < mask_low
    if mask_high is not None:
        outside |= rho > mask_high
    return outside


def importance_weighted_advantage(
    student_logp: Tensor,
    targets: Tensor,
    advantages: Tensor,
    behaviour_logp: Tensor,
    log_ratio: Tensor | None = None,
    *,
    truncate: float | None = None,
    mask_low: float | None = None,
    mask_high: float | None = None,
) -> TokenWeights:
    """Off-policy policy gradient: w = rho_t * A_t * 1[v = y_t], rho = pi_theta / mu.

    ``truncate`` caps rho at c (truncated importance sampling): the capped tokens keep the
    weight c * A_t, a bounded-variance estimate of the policy gradient, rather than the zero
    gradient of ``min(rho, c)``. ``log_ratio`` [c], when given, replaces the token-level log
    ratio (a sequence-level ratio, precomputed with the whole sequence). The objective is the
    importance-sampled surrogate ``-min(rho, c) A``.

    ``mask_low`` / ``mask_high`` drop (weight 0) the tokens whose ratio lies outside that
    band (masked importance sampling, IcePop): a token the sampler and the trainer disagree
    on that much teaches nothing reliable. With a sequence-level ``log_ratio`` both the
    truncation and the band act on the sequence's ratio: a whole response kept or cut.
    """
    rho = _ratio(student_logp, targets, behaviour_logp, log_ratio)
    weight = rho if truncate is None else truncated_ratio(rho, truncate)
    outside = _outside_band(rho, mask_low, mask_high)
    if outside is not None:
        weight = torch.where(outside, 0.0, weight)
    advantages = advantages.to(student_logp.dtype)
    return TokenWeights(coef=weight * advantages, objective=-weight * advantages)


def ppo_clip(
    student_logp: Tensor,
    targets: Tensor,
    advantages: Tensor,
    behaviour_logp: Tensor,
    log_ratio: Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    mask_low: float | None = None,
    mask_high: float | None = None,
) -> TokenWeights:
    """PPO's clipped surrogate: w = rho_t * A_t where the unclipped term is active, else 0.

    ``eps_high > eps_low`` is DAPO's clip-higher. ``log_ratio`` as in
    :func:`importance_weighted_advantage` (GSPO when it is the sequence-level ratio).
    The objective is ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``. ``mask_low``
    and ``mask_high`` drop tokens as in :func:`importance_weighted_advantage`.
    """
    rho = _ratio(student_logp, targets, behaviour_logp, log_ratio)
    advantages = advantages.to(student_logp.dtype)
    active = ppo_clip_active(rho, advantages, eps_low=eps_low, eps_high=eps_high)
    outside = _outside_band(rho, mask_low, mask_high)
    if outside is not None:
        active = active & ~outside
    clipped_rho = rho.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(rho * advantages, clipped_rho * advantages)
    return TokenWeights(coef=torch.where(active, rho * advantages, 0.0), objective=-surrogate)


def decoupled_ppo_clip(
    student_logp: Tensor,
    targets: Tensor,
    advantages: Tensor,
    behaviour_logp: Tensor,
    proximal_logp: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    truncate: float | None = None,
    mask_low: float | None = None,
    mask_high: float | None = None,
) -> TokenWeights:
    """Decoupled PPO (AReaL's): two policies behind a sampled token instead of one.

    The clip acts on ``rho = pi_theta / pi_prox``, the proximal policy being the trainer's
    at the step's start (``proximal_logp``), so the trust region is measured from weights
    the trainer held; the behaviour policy that sampled (``behaviour_logp``, an engine's,
    possibly several versions old) enters only through the importance weight ``u = pi_prox /
    mu``, truncated at ``truncate`` (TIS) and with the tokens whose ``u`` lies outside
    [``mask_low``, ``mask_high``] dropped (MIS, IcePop). w = min(u, c) rho A_t where PPO's
    unclipped term is active, else 0; the objective is ``-min(u, c) min(rho A, clip(rho) A)``.
    With a fresh sample and one update, pi_prox is pi_theta and this is truncated importance
    sampling of the behaviour policy.
    """
    logp_y = _gather(student_logp, targets)
    rho = ratio_from_log(logp_y - proximal_logp.to(student_logp.dtype))
    weight = ratio_from_log((proximal_logp - behaviour_logp).to(student_logp.dtype))
    outside = _outside_band(weight, mask_low, mask_high)
    if truncate is not None:
        weight = truncated_ratio(weight, truncate)
    advantages = advantages.to(student_logp.dtype)
    active = ppo_clip_active(rho, advantages, eps_low=eps_low, eps_high=eps_high)
    surrogate = weight * torch.minimum(rho * advantages, rho.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)
    if outside is not None:
        active = active & ~outside
        surrogate = torch.where(outside, 0.0, surrogate)
    return TokenWeights(coef=torch.where(active, weight * rho * advantages, 0.0), objective=-surrogate)


def k3_reference_penalty(
    student_logp: Tensor, targets: Tensor, reference_logp: Tensor, *, kl_coef: float
) -> TokenWeights:
    """KL-to-reference as a loss term, the k3 estimator on sampled tokens.

    ``k3 = r - log r - 1`` with ``r = pi_ref(y_t) / pi_theta(y_t)``: non-negative, unbiased
    for KL(pi_theta || pi_ref) under on-policy samples. Its gradient is ``(1 - r) grad l``,
    so w = kl_coef * (r - 1) * 1[v = y_t]. Add it to another builder's weights with
    :class:`~lightning_unified.losses.weight_sum.WeightSum`. (The k1 estimator belongs in the reward: see
    :func:`lightning_unified.losses.advantages.kl_penalized_rewards`.)
    """
    log_r = reference_logp.to(student_logp.dtype) - _gather(student_logp, targets)
    r_minus_1 = torch.expm1(log_r)  # exp(x) - 1 loses x near 0: the objective would go negative
    return TokenWeights(coef=kl_coef * r_minus_1, objective=kl_coef * (r_minus_1 - log_r))


def sampled_reverse_kl(student_logp: Tensor, targets: Tensor, teacher_token_logp: Tensor) -> TokenWeights:
    """Reverse KL through the sampled token: the teacher as a per-token reward.

    w = (l_T(y_t) - l_theta(y_t)) * 1[v = y_t] on tokens sampled from the student, whose
    expectation is the gradient of KL(student || teacher) at that position. Needs only the
    teacher's log-prob of the sampled token, which any API teacher returns. To sum the
    reward over future tokens, build advantages with
    :func:`lightning_unified.losses.advantages.reverse_kl_returns` and use
    :func:`advantage_indicator`. The objective is the per-token sample of the KL.
    """
    log_ratio = teacher_token_logp.to(student_logp.dtype) - _gather(student_logp, targets)
    return TokenWeights(coef=log_ratio, objective=-log_ratio)


def span_sampled_reverse_kl(student_logp: Tensor, targets: Tensor, span_log_ratio: Tensor,
                            span_share: Tensor) -> TokenWeights:
    """The sampled reverse KL taken span by span, for a teacher with another tokenizer:
    w = r_j * 1[v = y_t] on every student token of span j, with ``r_j = log pi_T(span) -
    log pi_theta(span)`` (:func:`lightning_unified.losses.spans.span_log_ratio`, from the
    policy as it is at this update). Its gradient is ``-sum_j r_j grad log pi_theta(span j)``,
    the span-level estimator's; with one token per span it is :func:`sampled_reverse_kl`.
    The objective is the span's KL sample ``-r_j``, shared over its tokens (``span_share``)."""
    ratio = span_log_ratio.to(student_logp.dtype)
    return TokenWeights(coef=ratio, objective=-ratio * span_share.to(student_logp.dtype))


def _span_distribution(student_logp: Tensor, span_end: Tensor, span_prefix_logp: Tensor, span_prefix_grad: Tensor,
                       teacher_span_topk_ids: Tensor, teacher_span_topk_logp: Tensor, match, beta: float) -> TokenWeights:
    """ULD or the hybrid, span by span: on a span's last token the objective of ``m(v) =
    pi(prefix) pi_theta(v)`` (:func:`lightning_unified.losses.uld.span_terms`) and the weight
    ``w(v) = -m(v) g(v)`` with ``g = d objective / d m``, whose gradient is the objective's
    through this position's logits; on the span's earlier tokens, ``-G`` on the token, with
    ``G = sum_v g(v) m(v)`` from before the update (``span_prefix_grad``): the objective's
    gradient through the prefix's log-probability."""
    ends = span_end.nonzero().squeeze(-1)
    dense = torch.zeros_like(student_logp)
    objective = student_logp.new_zeros(student_logp.shape[0])
    if ends.numel():
        merged = student_logp.index_select(0, ends) + span_prefix_logp.index_select(0, ends).to(student_logp.dtype)[:, None]
        value, grad = span_terms(merged, teacher_span_topk_ids.index_select(0, ends),
                                 teacher_span_topk_logp.index_select(0, ends), match, beta)
        dense.index_copy_(0, ends, -(merged.exp() * grad).to(student_logp.dtype))
        objective.index_copy_(0, ends, value.to(student_logp.dtype))
    return TokenWeights(coef=-span_prefix_grad.to(student_logp.dtype), dense=dense, objective=objective)


def uld(student_logp: Tensor, targets: Tensor, span_end: Tensor, span_prefix_logp: Tensor, span_prefix_grad: Tensor,
        teacher_span_topk_ids: Tensor, teacher_span_topk_logp: Tensor) -> TokenWeights:
    """Universal Logit Distillation across tokenizers, span by span: the L1 distance of the
    two sorted distributions of the span's continuations (:mod:`lightning_unified.losses.uld`)."""
    return _span_distribution(student_logp, span_end, span_prefix_logp, span_prefix_grad, teacher_span_topk_ids,
                              teacher_span_topk_logp, None, 0.5)


def uld_hybrid(student_logp: Tensor, targets: Tensor, span_end: Tensor, span_prefix_logp: Tensor,
               span_prefix_grad: Tensor, teacher_span_topk_ids: Tensor, teacher_span_topk_logp: Tensor, *,
               vocabulary_match, beta: float) -> TokenWeights:
    """GOLD's hybrid across tokenizers, span by span: the generalised JSD (``beta``) on the
    tokens both vocabularies share, ULD on the rest (:mod:`lightning_unified.losses.uld`)."""
    return _span_distribution(student_logp, span_end, span_prefix_logp, span_prefix_grad, teacher_span_topk_ids,
                              teacher_span_topk_logp, vocabulary_match, beta)


def preference(student_logp: Tensor, targets: Tensor, preference_weight: Tensor, preference_loss: Tensor) -> TokenWeights:
    """Preference pairs (DPO, IPO, SimPO): w = g * 1[v = y_t] with the pair's sequence-level
    weight g, +g on the chosen response and -g on the rejected one
    (:func:`lightning_unified.losses.preference.preference_terms` computes both fields from
    the whole sequences). The objective is the pair's loss, shared over its tokens."""
    return TokenWeights(coef=preference_weight.to(student_logp.dtype), objective=preference_loss.to(student_logp.dtype))


# --- dense: weight over the vocabulary from a teacher -----------------------------------


def forward_kl(student_logp: Tensor, targets: Tensor, teacher_logp: Tensor) -> TokenWeights:
    """KL(teacher || student) over the full vocabulary: w = pi_T(v)."""
    teacher_p = teacher_logp.exp()
    # a distribution's probabilities sum to 1: the gradient needs no pass to find it
    return TokenWeights(dense=teacher_p, objective=_kl_terms(teacher_logp, student_logp, teacher_p),
                        dense_total=torch.ones_like(teacher_p[:, 0]))


def forward_kl_topk(
    student_logp: Tensor,
    targets: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logp: Tensor,
    *,
    tail: str = "bucket",
) -> TokenWeights:
    """KL(teacher || student) from the teacher's top-k ids [c, K] and log-probs [c, K].

    The teacher's remaining mass ``1 - sum_k pi_T`` is its tail. ``tail="bucket"`` keeps it
    as one more category, the tokens outside the top-k, matched against the student's mass
    there: the KL over (k + 1) categories. Its weight on each outside token is
    ``tail_T * pi_theta(v) / tail_theta``: the teacher's tail shared out like the student's.
    ``tail="renormalize"`` drops the tail and renormalises the teacher over its top-k.
    """
    teacher_topk_logp = teacher_topk_logp.to(student_logp.dtype)
    student_topk = student_logp.gather(-1, teacher_topk_ids)  # [c, K]
    if tail == "renormalize":
        teacher_q = torch.log_softmax(teacher_topk_logp, dim=-1)
        return TokenWeights(
            topk_ids=teacher_topk_ids,
            topk_weight=teacher_q.exp(),
            objective=_kl_terms(teacher_q, student_topk),
        )
    if tail != "bucket":
        raise ValueError(f"forward_kl_topk: tail must be 'bucket' or 'renormalize', got {tail!r}")
    tiny = torch.finfo(student_logp.dtype).tiny
    teacher_topk_p = teacher_topk_logp.exp()  # [c, K]
    # a top-k that already sums to 1 (up to rounding) leaves no tail
    teacher_tail = (1.0 - teacher_topk_p.sum(-1)).clamp_min(0.0)  # [c]
    # in place on the fresh exp(): one pass over [c, V] fewer
    student_outside = student_logp.exp().scatter_(-1, teacher_topk_ids, 0.0)  # [c, V] pi_theta off the top-k
    student_tail = student_outside.sum(-1).clamp_min(tiny)  # [c]
    tail_kl = torch.where(teacher_tail > 0, teacher_tail * (teacher_tail.clamp_min(tiny).log() - student_tail.log()), 0.0)
    return TokenWeights(
        topk_ids=teacher_topk_ids,
        topk_weight=teacher_topk_p,
        dense=student_outside.mul_((teacher_tail / student_tail).unsqueeze(-1)),
        objective=_kl_terms(teacher_topk_logp, student_topk, teacher_topk_p) + tail_kl,
    )


def reverse_kl(student_logp: Tensor, targets: Tensor, teacher_logp: Tensor) -> TokenWeights:
    """Exact KL(student || teacher) over the full vocabulary: w = pi_theta(v) (l_T(v) - l_theta(v))."""
    student_p = student_logp.exp()
    log_ratio = teacher_logp - student_logp
    # the KL is -sum_v w(v): no second pass over the vocabulary for the metric
    dense = student_p * log_ratio
    total = dense.sum(-1)
    return TokenWeights(dense=dense, objective=-total, dense_total=total)


def jsd(student_logp: Tensor, targets: Tensor, teacher_logp: Tensor, *, beta: float = 0.5) -> TokenWeights:
    """Generalised Jensen-Shannon divergence (GKD) with M = beta pi_T + (1 - beta) pi_theta.

    ``JSD_beta = beta KL(T || M) + (1 - beta) KL(theta || M)``. Its gradient in pi_theta is
    ``(1 - beta) log(pi_theta / M)``, so w = (1 - beta) pi_theta (l_M - l_theta). As in GKD,
    beta = 0 is forward KL(T || theta) and beta = 1 is reverse KL(theta || T): the two limits
    of JSD_beta / beta and JSD_beta / (1 - beta).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, targets, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, targets, teacher_logp)
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    objective = beta * _kl_terms(teacher_logp, mixture_logp) + (1.0 - beta) * _kl_terms(student_logp, mixture_logp)
    dense = (1.0 - beta) * student_logp.exp() * (mixture_logp - student_logp)
    return TokenWeights(dense=dense, objective=objective)
