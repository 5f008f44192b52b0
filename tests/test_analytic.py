"""Cases with known answers: zero divergences, equivalences between quadrants, exact clipping."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.importance import ppo_clip_active
from lightning_unified.losses.objective import TeacherLogits, chunked_weighted_nll
from tests.plain_loss import weighted_nll_from_logits
from tests.conftest import make_problem

TOL = dict(rtol=1e-6, atol=1e-9)


def _grads(p, weight_fn, *, teacher=None, fields=None, chunk_size=5):
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(
        p.hidden, p.head, p.targets, scale, weight_fn, teacher=teacher, fields=fields or {}, chunk_size=chunk_size
    )
    return out, torch.autograd.grad(out.loss, p.leaves())


@pytest.mark.parametrize(
    "weight_fn",
    [weight_builders.forward_kl, weight_builders.reverse_kl, partial(weight_builders.jsd, beta=0.3), partial(weight_builders.jsd, beta=0.9)],
    ids=["forward_kl", "reverse_kl", "jsd_0.3", "jsd_0.9"],
)
def test_identical_distributions_give_zero_divergence_and_gradient(weight_fn) -> None:
    p = make_problem(seed=10)
    teacher = TeacherLogits(hidden=p.hidden.detach(), head_weight=p.head.detach())  # the student itself
    out, grads = _grads(p, weight_fn, teacher=teacher)
    assert abs(out.objective.item()) < 1e-12
    for g in grads:
        assert g.abs().max() < 1e-12


def test_uniform_teacher_and_student_give_zero_kl() -> None:
    p = make_problem(seed=11)
    zero_head = torch.zeros_like(p.head, requires_grad=True)
    teacher = TeacherLogits(logits=torch.zeros(*p.targets.shape, p.vocab, dtype=torch.float64))
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(p.hidden, zero_head, p.targets, scale, weight_builders.forward_kl, teacher=teacher)
    assert out.objective.item() == pytest.approx(0.0, abs=1e-12)


def test_one_hot_teacher_under_forward_kl_is_sft() -> None:
    p = make_problem(seed=12)
    one_hot_logits = torch.full((*p.targets.shape, p.vocab), float("-inf"), dtype=torch.float64)
    one_hot_logits.scatter_(-1, p.safe_targets()[..., None], 0.0)
    kl, kl_grads = _grads(p, weight_builders.forward_kl, teacher=TeacherLogits(logits=one_hot_logits))
    sft, sft_grads = _grads(p, weight_builders.indicator)
    torch.testing.assert_close(kl.loss, sft.loss, **TOL)
    torch.testing.assert_close(kl.objective, sft.objective, **TOL)  # KL to a one-hot is the CE
    for a, b in zip(kl_grads, sft_grads):
        torch.testing.assert_close(a, b, **TOL)
    # the top-k form with k = 1 and probability 1 is SFT too
    topk = {"teacher_topk_ids": p.safe_targets()[..., None], "teacher_topk_logp": torch.zeros(*p.targets.shape, 1, dtype=torch.float64)}
    _, topk_grads = _grads(p, weight_builders.forward_kl_topk, fields=topk)
    for a, b in zip(topk_grads, sft_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_ratio_of_one_is_the_on_policy_gradient() -> None:
    """With behaviour log-probs equal to the policy's own, importance weighting and PPO's
    clip change nothing: off-policy weights reduce to on-policy ones."""
    p = make_problem(seed=13)
    with torch.no_grad():
        own = torch.log_softmax(p.student_logits(), -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    fields = {"advantages": p.advantages, "behaviour_logp": own}
    _, on_policy = _grads(p, weight_builders.advantage_indicator, fields={"advantages": p.advantages})
    for weight_fn in (weight_builders.importance_weighted_advantage, weight_builders.ppo_clip, partial(weight_builders.importance_weighted_advantage, truncate=1.0)):
        _, grads = _grads(p, weight_fn, fields=fields)
        for a, b in zip(grads, on_policy):
            torch.testing.assert_close(a, b, **TOL)


def _chunk_inputs(seed=14):
    p = make_problem(seed=seed)
    logits = p.student_logits().detach().reshape(-1, p.vocab)
    keep = p.mask.reshape(-1).bool()
    logits, targets = logits[keep], p.targets.reshape(-1)[keep]
    logp = torch.log_softmax(logits, -1)
    return p, logits, targets, logp


def test_truncation_caps_exactly_the_tokens_above_c() -> None:
    p, _, targets, logp = _chunk_inputs()
    keep = p.mask.reshape(-1).bool()
    adv, mu = p.advantages.reshape(-1)[keep], p.behaviour_logp.reshape(-1)[keep]
    rho = (logp.gather(-1, targets[:, None])[:, 0] - mu).exp()
    c = rho.median().item()
    w = weight_builders.importance_weighted_advantage(logp, targets, adv, mu, truncate=c)
    above = rho > c
    assert 0 < above.sum() < above.numel()
    torch.testing.assert_close(w.coef[above], c * adv[above])
    torch.testing.assert_close(w.coef[~above], rho[~above] * adv[~above])


def test_ppo_clip_zeroes_exactly_the_clipped_tokens() -> None:
    p, logits, targets, logp = _chunk_inputs()
    keep = p.mask.reshape(-1).bool()
    adv, mu = p.advantages.reshape(-1)[keep], p.behaviour_logp.reshape(-1)[keep]
    rho = (logp.gather(-1, targets[:, None])[:, 0] - mu).exp()
    eps_low, eps_high = 0.1, 0.2
    expected_clipped = ((adv > 0) & (rho > 1 + eps_high)) | ((adv < 0) & (rho < 1 - eps_low))
    assert 0 < expected_clipped.sum() < expected_clipped.numel()
    assert torch.equal(~ppo_clip_active(rho, adv, eps_low=eps_low, eps_high=eps_high), expected_clipped)

    weight_fn = partial(weight_builders.ppo_clip, eps_low=eps_low, eps_high=eps_high)
    logits = logits.clone().requires_grad_()
    out = weighted_nll_from_logits(
        logits, targets, torch.ones_like(adv), weight_fn, fields={"advantages": adv, "behaviour_logp": mu}
    )
    (grad,) = torch.autograd.grad(out.loss, logits)
    row_norm = grad.abs().sum(-1)
    assert torch.all(row_norm[expected_clipped] == 0)
    assert torch.all(row_norm[~expected_clipped & (adv != 0)] > 0)


@pytest.mark.parametrize("limit", ["forward", "reverse"])
def test_jsd_limits_are_forward_and_reverse_kl(limit: str) -> None:
    p = make_problem(seed=15)
    teacher = TeacherLogits(hidden=p.teacher_hidden, head_weight=p.teacher_head)
    beta, kl_fn = (1e-9, weight_builders.forward_kl) if limit == "forward" else (1 - 1e-9, weight_builders.reverse_kl)
    scale_by = beta if limit == "forward" else 1 - beta
    jsd_out, jsd_grads = _grads(p, partial(weight_builders.jsd, beta=beta), teacher=teacher)
    kl_out, kl_grads = _grads(p, kl_fn, teacher=teacher)
    assert jsd_out.objective.item() / scale_by == pytest.approx(kl_out.objective.item(), rel=1e-4)
    for a, b in zip(jsd_grads, kl_grads):
        torch.testing.assert_close(a / scale_by, b, rtol=1e-3, atol=1e-6)
    # and at the endpoints themselves, JSD is defined as the KL (as in GKD)
    end_out, end_grads = _grads(p, partial(weight_builders.jsd, beta=0.0 if limit == "forward" else 1.0), teacher=teacher)
    torch.testing.assert_close(end_out.objective, kl_out.objective)
    for a, b in zip(end_grads, kl_grads):
        torch.testing.assert_close(a, b)
