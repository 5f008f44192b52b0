"""Each weight builder's gradient equals the autograd gradient of its closed-form objective."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lightning_unified.losses import advantages as adv
from lightning_unified.losses import importance, weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import chunked_weighted_nll, target_logprobs
from tests.builder_cases import CASE_IDS, CASES, Case
from tests.conftest import Problem, make_problem

TOL = dict(rtol=1e-5, atol=1e-7)


def run_chunked(p: Problem, case: Case, scale: torch.Tensor, chunk_size: int = 5):
    return chunked_weighted_nll(
        p.hidden,
        p.head,
        p.targets,
        scale,
        case.weight_fn,
        fields=case.fields(p),
        teacher=case.teacher(p),
        temperature=case.temperature,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_gradient_matches_closed_form(case: Case, aggregation: str) -> None:
    p = make_problem(seed=1)
    scale = token_scale(p.mask, aggregation)
    out = run_chunked(p, case, scale)
    got = torch.autograd.grad(out.loss, p.leaves())

    student_logp = torch.log_softmax(p.student_logits() / case.temperature, -1)
    closed = (case.closed(p, student_logp) * scale).sum()
    want = torch.autograd.grad(closed, p.leaves())

    assert closed.abs() > 1e-6 or case.name == "k3_reference"  # a non-trivial objective
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-4  # the comparison is not between two zeros
        torch.testing.assert_close(g, w, **TOL)
    # the reported objective is the closed form's value, not the surrogate's
    torch.testing.assert_close(out.objective, closed.detach(), **TOL)


def test_ppo_case_has_clipped_and_unclipped_tokens() -> None:
    """The PPO gradient test above only means something if both regimes occur in it."""
    p = make_problem(seed=1)
    logp_y = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    rho = (logp_y - p.behaviour_logp).exp()[p.mask.bool()]
    active = importance.ppo_clip_active(rho, p.advantages[p.mask.bool()], eps_low=0.2, eps_high=0.28)
    assert 0 < active.sum() < active.numel()


def test_the_decoupled_case_has_every_regime() -> None:
    """The decoupled PPO cases above mean something only if tokens are clipped and not,
    truncated and not, and masked and not, in them."""
    from tests.builder_cases import proximal_logp

    p = make_problem(seed=1)
    logp_y = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    valid = p.mask.bool()
    prox = proximal_logp(p)
    rho = (logp_y - prox).exp()[valid]
    u = (prox - p.behaviour_logp).exp()[valid]
    active = importance.ppo_clip_active(rho, p.advantages[valid], eps_low=0.2, eps_high=0.28)
    masked = (u < 0.8) | (u > 1.25)
    for regime in (active, u > 1.2, masked):
        assert 0 < regime.sum() < regime.numel()


def test_the_truncated_and_masked_cases_have_every_regime() -> None:
    """TIS and MIS mean something only if tokens (and whole responses, at the sequence
    level) lie above the truncation, below and above the band, and inside it."""
    from tests.builder_cases import sequence_ratio

    p = make_problem(seed=1)
    logp_y = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    valid = p.mask.bool()
    rho = (logp_y - p.behaviour_logp).exp()[valid]
    for regime in (rho > 1.2, rho < 0.8, rho > 1.25, (rho >= 0.8) & (rho <= 1.2)):
        assert 0 < regime.sum() < regime.numel(), rho
    rho = sequence_ratio(p)[:, 0]  # the sequence case's responses: truncated, cut, kept as they are
    for regime in (rho > 1.1, rho < 0.84, (rho >= 0.84) & (rho <= 1.1)):
        assert 0 < regime.sum() < regime.numel(), rho


def test_sequence_level_ppo_matches_gspo_objective() -> None:
    """Sequence ratio s_i = exp(mean_t log rho), GSPO's clipped objective, seq-mean aggregation."""
    p = make_problem(seed=2)
    eps_low, eps_high = 0.1, 0.15
    seq_adv = p.advantages[:, 0]
    # the weights need the current log-probs of whole sequences: a no-grad pass first
    logp_now = target_logprobs(p.hidden.detach(), p.head.detach(), p.targets) * p.mask
    log_s = importance.sequence_log_ratio(logp_now, p.behaviour_logp, p.mask)
    scale = token_scale(p.mask, "seq_mean_token_mean")
    out = chunked_weighted_nll(
        p.hidden,
        p.head,
        p.targets,
        scale,
        weight_builders.ppo_clip,
        fields={"advantages": p.advantages, "behaviour_logp": p.behaviour_logp, "log_ratio": log_s},
        chunk_size=4,
    )
    got = torch.autograd.grad(out.loss, p.leaves())

    logp_y = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    lengths = p.mask.sum(-1)
    s = (((logp_y - p.behaviour_logp) * p.mask).sum(-1) / lengths).exp()  # [B]
    gspo = -torch.min(s * seq_adv, s.clamp(1 - eps_low, 1 + eps_high) * seq_adv).mean()
    want = torch.autograd.grad(gspo, p.leaves())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    torch.testing.assert_close(out.objective, gspo.detach(), **TOL)


def test_sampled_reverse_kl_is_unbiased_for_the_reverse_kl_gradient() -> None:
    """Enumerate every token at each position, weighted by the student's probability: the
    expected gradient of the sampled-token estimator is the exact reverse-KL gradient."""
    p = make_problem(seed=3)
    B, T, V = p.targets.shape + (p.vocab,)
    student_logp = torch.log_softmax(p.student_logits(), -1)
    teacher_logp = torch.log_softmax(p.teacher_logits(), -1)
    every_token = torch.arange(V).expand(B, T, V)  # [B, T, V] all possible y_t
    hidden = p.hidden.unsqueeze(2).expand(B, T, V, -1)
    prob = student_logp.detach().exp() * p.mask[..., None]  # expectation weights
    out = chunked_weighted_nll(
        hidden,
        p.head,
        every_token,
        prob / p.mask.sum(),
        weight_builders.sampled_reverse_kl,
        fields={"teacher_token_logp": teacher_logp.detach()},
        chunk_size=7,
    )
    got = torch.autograd.grad(out.loss, p.leaves())
    exact = (F.kl_div(teacher_logp, student_logp, log_target=True, reduction="none").sum(-1) * p.mask).sum() / p.mask.sum()
    want = torch.autograd.grad(exact, p.leaves())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    torch.testing.assert_close(out.objective, exact.detach(), **TOL)


def test_reverse_kl_returns_give_the_sequence_kl_gradient() -> None:
    """Two-step sequences over 3 tokens, enumerated: advantages summed over future tokens
    give the exact gradient of KL(student || teacher) between sequence distributions."""
    torch.manual_seed(0)
    V = 3
    # tabular policies: state 0 is the start, state 1 + y1 follows token y1
    states = 1 + V
    student_table = torch.randn(V, states, dtype=torch.float64, requires_grad=True)  # [V, S] head
    teacher_table = torch.randn(V, states, dtype=torch.float64)
    onehot = torch.eye(states, dtype=torch.float64)

    sequences = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [9, 2]
    hidden = torch.stack([onehot[0].expand(len(sequences), -1), onehot[1 + sequences[:, 0]]], dim=1)  # [9, 2, S]
    student_logp = torch.log_softmax(hidden @ student_table.T, -1).gather(-1, sequences[..., None])[..., 0]
    teacher_logp = torch.log_softmax(hidden @ teacher_table.T, -1).gather(-1, sequences[..., None])[..., 0]
    mask = torch.ones_like(student_logp)
    seq_prob = student_logp.sum(-1).exp().detach()  # [9]

    returns = adv.reverse_kl_returns(teacher_logp.detach(), student_logp.detach(), mask)
    out = chunked_weighted_nll(
        hidden,
        student_table,
        sequences,
        seq_prob[:, None].expand(-1, 2).contiguous(),
        weight_builders.advantage_indicator,
        fields={"advantages": returns},
        chunk_size=5,
    )
    (got,) = torch.autograd.grad(out.loss, student_table)
    seq_kl = (student_logp.sum(-1).exp() * (student_logp.sum(-1) - teacher_logp.sum(-1))).sum()
    (want,) = torch.autograd.grad(seq_kl, student_table)
    torch.testing.assert_close(got, want, **TOL)
    # without the future rewards the estimator is biased: the test can tell the difference
    per_token = teacher_logp.detach() - student_logp.detach()
    biased = chunked_weighted_nll(
        hidden, student_table, sequences, seq_prob[:, None].expand(-1, 2).contiguous(),
        weight_builders.advantage_indicator, fields={"advantages": per_token},
    )
    (biased_grad,) = torch.autograd.grad(biased.loss, student_table)
    assert (biased_grad - want).abs().max() > 1e-3


def test_a_dense_part_scaled_apart_gives_the_materialised_weights() -> None:
    """Scaling keeps a dense part's per-token factor apart (a [c] multiply instead of a
    [c, V] product); the log-likelihood, the row totals and the logit gradient must equal
    those of the product written out, alone and when two scaled dense parts are added."""
    from lightning_unified.losses.token_weights import TokenWeights, weighted_log_likelihood, weighted_nll_logit_grad

    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 11, generator=gen), -1)
    targets = torch.randint(0, 11, (6,), generator=gen)
    dense_a, dense_b = torch.rand(6, 11, generator=gen), torch.rand(6, 11, generator=gen)
    scale_a, scale_b = torch.rand(6, generator=gen), torch.rand(6, generator=gen)
    coef = torch.rand(6, generator=gen)
    kept = TokenWeights(coef=coef, dense=dense_a, dense_total=dense_a.sum(-1)).scaled(scale_a)
    written = TokenWeights(coef=coef * scale_a, dense=dense_a * scale_a[:, None])
    assert kept.dense is dense_a and kept.dense_scale is not None
    summed = kept + TokenWeights(dense=dense_b).scaled(scale_b)
    summed_written = written + TokenWeights(dense=dense_b * scale_b[:, None])
    for ours, reference in ((kept, written), (summed, summed_written)):
        torch.testing.assert_close(weighted_log_likelihood(logp, targets, ours),
                                   weighted_log_likelihood(logp, targets, reference))
        torch.testing.assert_close(ours.total(logp), reference.total(logp))
        torch.testing.assert_close(weighted_nll_logit_grad(logp, targets, ours),
                                   weighted_nll_logit_grad(logp, targets, reference))


def test_a_dense_part_that_is_the_students_own_log_probs_is_not_overwritten() -> None:
    """The chunk writes the logit gradient over the log-probs' memory; a builder may hand
    back those log-probs themselves as its dense part (here w = log pi_theta, a constant),
    which must be copied first, or the gradient would read the values it overwrote."""
    from lightning_unified.losses.token_weights import TokenWeights
    from tests.plain_loss import weighted_nll_from_logits

    def own_log_probs(student_logp, targets):
        return TokenWeights(dense=student_logp)

    p = make_problem()
    scale = token_scale(p.mask, "token_mean")
    chunked = chunked_weighted_nll(p.hidden, p.head, p.targets, scale, own_log_probs, chunk_size=5)
    chunked.loss.backward()
    grads = (p.hidden.grad.clone(), p.head.grad.clone())
    p.hidden.grad = p.head.grad = None
    plain = weighted_nll_from_logits(p.hidden @ p.head.T, p.targets, scale, own_log_probs)
    plain.loss.backward()
    torch.testing.assert_close(chunked.loss, plain.loss, **TOL)
    torch.testing.assert_close(grads[0], p.hidden.grad, **TOL)
    torch.testing.assert_close(grads[1], p.head.grad, **TOL)
