"""The chunked loss equals the plain loss from full logits, for every builder and chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import TeacherLogits, chunked_weighted_nll, target_logprobs
from tests.plain_loss import weighted_nll_from_logits
from tests.builder_cases import CASE_IDS, CASES, Case
from tests.conftest import make_problem

TOL = dict(rtol=1e-6, atol=1e-9)


def _plain(p, case: Case, scale, logits_fn=None):
    logits = p.student_logits() if logits_fn is None else logits_fn(p.student_logits())
    return weighted_nll_from_logits(
        logits, p.targets, scale, case.weight_fn, fields=case.fields(p), teacher=case.teacher(p),
        temperature=case.temperature, chunk_size=10_000,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 17, 10_000])  # 17 kept tokens: 1 and 17 divide it
def test_chunked_equals_unchunked(case: Case, chunk_size: int) -> None:
    p = make_problem(seed=4)
    scale = token_scale(p.mask, "token_mean")
    assert p.mask.sum() == 17 and (p.targets == -100).any()  # padding is present and masked
    plain = _plain(p, case, scale)
    want = torch.autograd.grad(plain.loss, p.leaves())
    chunked = chunked_weighted_nll(
        p.hidden, p.head, p.targets, scale, case.weight_fn, fields=case.fields(p), teacher=case.teacher(p),
        temperature=case.temperature, chunk_size=chunk_size,
    )
    got = torch.autograd.grad(chunked.loss, p.leaves())
    torch.testing.assert_close(chunked.loss, plain.loss, **TOL)
    torch.testing.assert_close(chunked.objective, plain.objective, **TOL)
    torch.testing.assert_close(chunked.target_logp, plain.target_logp, **TOL)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_head_bias_gets_its_gradient() -> None:
    p = make_problem(seed=5)
    bias = torch.randn(p.vocab, dtype=torch.float64, requires_grad=True)
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(p.hidden, p.head, p.targets, scale, weight_builders.indicator, head_bias=bias, chunk_size=3)
    got = torch.autograd.grad(out.loss, (p.hidden, p.head, bias))
    logits = p.student_logits() + bias
    ce = F.cross_entropy(logits.reshape(-1, p.vocab), p.targets.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(ce, (p.hidden, p.head, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_target_logprobs_match_log_softmax() -> None:
    p = make_problem(seed=7)
    got = target_logprobs(p.hidden, p.head, p.targets, chunk_size=5, temperature=1.5)
    want = torch.log_softmax(p.student_logits() / 1.5, -1).gather(-1, p.safe_targets()[..., None])[..., 0]
    torch.testing.assert_close(got, want.detach(), **TOL)
    assert not got.requires_grad


def test_frozen_head_gets_no_gradient_and_bf16_runs() -> None:
    """A frozen head (LoRA) is skipped; bf16 inputs come back as bf16 gradients."""
    p = make_problem(seed=8)
    hidden = p.hidden.detach().to(torch.bfloat16).requires_grad_()
    head = p.head.detach().to(torch.bfloat16)
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(hidden, head, p.targets, scale, weight_builders.indicator, chunk_size=4)
    out.loss.backward()
    assert head.grad is None and hidden.grad.dtype == torch.bfloat16
    ce = F.cross_entropy(p.student_logits().reshape(-1, p.vocab), p.targets.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - ce.item()) < 0.05 * ce.item()
