"""The sampled reverse KL span by span (distillation across tokenizers): the chunked loss's
gradient equals, in float64, autograd of the span-level closed form written with explicit
loops over each span's tokens; with one token per span it is the token-level estimator."""

from __future__ import annotations

import torch

from lightning_unified.losses import weight_builders
from lightning_unified.losses.objective import chunked_weighted_nll
from lightning_unified.losses.spans import span_ids, span_log_ratio

# two rows of 6 student tokens: spans of 1, 2 and 3 tokens, and a row whose last token is padding
SPANS = [[(0, 1, 0, 2), (1, 3, 2, 3), (3, 6, 3, 4)], [(0, 2, 0, 1), (2, 3, 1, 3), (3, 5, 3, 5)]]


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6), generator=gen)
    teacher_span_logp = -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 4
    span_id = torch.tensor([span_ids(row, 6) for row in SPANS])
    return hidden, head, targets, teacher_span_logp, span_id


def test_the_span_level_gradient_is_autograd_of_its_closed_form() -> None:
    hidden, head, targets, teacher_span_logp, span_id = problem()
    mask = (span_id >= 0).to(torch.float64)
    with torch.no_grad():  # the policy as it is at this update
        student_logp = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets[..., None])[..., 0]
    ratio, share = span_log_ratio(student_logp, teacher_span_logp, span_id)
    out = chunked_weighted_nll(hidden, head, targets, mask, weight_builders.span_sampled_reverse_kl,
                               fields={"span_log_ratio": ratio, "span_share": share}, chunk_size=4)
    got = torch.autograd.grad(out.loss, (hidden, head))

    # the closed form: -sum_j stopgrad(log pi_T(span j) - log pi_theta(span j)) log pi_theta(span j)
    logp = torch.log_softmax(hidden @ head.T, -1)
    surrogate, kl = 0.0, 0.0
    for b, row in enumerate(SPANS):
        for j, (s0, s1, _, _) in enumerate(row):
            span = sum(logp[b, t, targets[b, t]] for t in range(s0, s1))
            r = teacher_span_logp[b, j] - span.detach()
            surrogate = surrogate - r * span
            kl = kl - r
    want = torch.autograd.grad(surrogate, (hidden, head))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.objective, kl.detach(), rtol=1e-10, atol=1e-12)


def test_one_token_per_span_is_the_token_level_estimator() -> None:
    hidden, head, targets, _, _ = problem(seed=1)
    gen = torch.Generator().manual_seed(2)
    teacher_token_logp = -torch.rand(2, 6, generator=gen, dtype=torch.float64) * 4
    mask = torch.ones(2, 6, dtype=torch.float64)
    with torch.no_grad():
        student_logp = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets[..., None])[..., 0]
    span_id = torch.arange(6).expand(2, 6)  # each token its own span: identical tokenizers
    ratio, share = span_log_ratio(student_logp, teacher_token_logp, span_id)
    spans = chunked_weighted_nll(hidden, head, targets, mask, weight_builders.span_sampled_reverse_kl,
                                 fields={"span_log_ratio": ratio, "span_share": share})
    tokens = chunked_weighted_nll(hidden, head, targets, mask, weight_builders.sampled_reverse_kl,
                                  fields={"teacher_token_logp": teacher_token_logp})
    for a, b in zip(torch.autograd.grad(spans.loss, (hidden, head)), torch.autograd.grad(tokens.loss, (hidden, head))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spans.objective, tokens.objective)
