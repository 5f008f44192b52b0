"""The sampled reverse KL span by span (distillation across tokenizers): the chunked loss's
gradient equals, in float64, autograd of the span-level closed form written with explicit
loops over each span's tokens; with one token per span it is the token-level estimator.
The bridge's span fields, built for the whole batch at once, are the loop over each span."""

from __future__ import annotations

import functools

import pytest
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


# --- the bridge's span fields, against a loop over each span -----------------------------


def test_the_bridges_span_fields_are_the_loop_over_each_span() -> None:
    """Spans of several student tokens and of several teacher tokens, two rows of different
    lengths: each span's teacher log-prob, its end, and on its last student token the
    teacher's top-k at its last token plus the log-prob of its earlier tokens."""
    from lightning_unified.data.alignment import Alignment
    from lightning_unified.teachers.tokenizers import TeacherRows, TokenizerBridge
    from tests.lightning_helpers import chat_tokenizer, pairs_tokenizer

    alignments = [Alignment("", [], [(0, 1, 0, 3), (1, 3, 3, 4), (3, 4, 4, 6)]),
                  Alignment("", [], [(0, 2, 0, 1), (2, 3, 1, 4)])]
    width, teacher_width, k = 5, 6, 3
    gen = torch.Generator().manual_seed(0)
    rows = TeacherRows(*(torch.zeros(2, 1, dtype=torch.long) for _ in range(4)), alignments,
                       torch.zeros(2, teacher_width, dtype=torch.bool), failed=[])
    teacher_logp = -torch.rand(2, teacher_width, generator=gen, dtype=torch.float64) * 3
    teacher_logp[1, 4:] = 0.0  # padding
    topk_ids = torch.randint(0, 100, (2, teacher_width, k), generator=gen)
    topk_logp = -torch.rand(2, teacher_width, k, generator=gen) * 5
    bridge = TokenizerBridge(chat_tokenizer(), pairs_tokenizer())
    span = bridge.span_fields(rows, teacher_logp, width)
    topk = bridge.span_topk_fields(rows, teacher_logp, topk_ids, topk_logp, width, None)
    for b, alignment in enumerate(alignments):
        for j, (s0, s1, t0, t1) in enumerate(alignment.spans):
            assert span["span_id"][b, s0:s1].tolist() == [j] * (s1 - s0)
            assert span["span_end"][b, s0:s1].tolist() == [0.0] * (s1 - s0 - 1) + [1.0]
            assert span["teacher_span_logp"][b, j].item() == pytest.approx(teacher_logp[b, t0:t1].sum().item())
            earlier = teacher_logp[b, t0:t1 - 1].sum().float()
            torch.testing.assert_close(topk["teacher_span_topk_logp"][b, s1 - 1], topk_logp[b, t1 - 1] + earlier)
            assert topk["teacher_span_topk_ids"][b, s1 - 1].tolist() == [-1] * k  # no vocabulary match given
    assert span["span_id"][1, 3:].tolist() == [-1, -1] and span["span_end"][1, 3:].tolist() == [0.0, 0.0]
    assert (topk["teacher_span_topk_logp"][[0, 1], [1, 0]] == -1.0e4).all(), "no entry before a span's end"


# --- ULD's prefix terms, a chunk of span ends at a time ----------------------------------


def uld_problem(seed: int = 0):
    """Two rows of 7 student tokens (vocabulary 11, hidden 5) in spans of 1 to 3 tokens, the
    second row padded; a teacher's top-6 at each token; float64."""
    gen = torch.Generator().manual_seed(seed)
    spans = [[(0, 1, 0, 1), (1, 3, 1, 2), (3, 6, 2, 4), (6, 7, 4, 5)], [(0, 2, 0, 1), (2, 3, 1, 3), (3, 5, 3, 4)]]
    span_id = torch.tensor([span_ids(row, 7) for row in spans])
    span_end = torch.zeros(2, 7, dtype=torch.bool)
    for b, row in enumerate(spans):
        for _, s1, _, _ in row:
            span_end[b, s1 - 1] = True
    hidden = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    head = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    logp = torch.log_softmax(hidden @ head.T, -1)
    token_logp = torch.where(span_id >= 0, logp.gather(-1, targets[..., None])[..., 0], 0.0)
    teacher_ids = torch.randint(-1, 11, (2, 7, 6), generator=gen)
    teacher_logp = torch.log_softmax(torch.randn(2, 7, 6, generator=gen, dtype=torch.float64), -1) - 0.5
    return hidden, head, targets, token_logp, span_id, span_end, teacher_ids, teacher_logp


def matched_vocabulary():
    from lightning_unified.losses.uld import VocabularyMatch

    to_student = torch.tensor([3, -1, 0, 7, -1, 10, 2, -1])
    matched = torch.zeros(11, dtype=torch.bool)
    matched[to_student[to_student >= 0]] = True
    return VocabularyMatch(matched, to_student, 0.6, 0.4)


@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
def test_the_prefix_terms_in_chunks_of_span_ends_are_the_unchunked_ones(hybrid: bool) -> None:
    from lightning_unified.losses.spans import span_prefix_fields, span_sums
    from lightning_unified.losses.teacher_logits import TeacherLogits
    from lightning_unified.losses.uld import span_terms

    hidden, head, _, token_logp, span_id, span_end, teacher_ids, teacher_logp = uld_problem()
    match = matched_vocabulary() if hybrid else None
    # unchunked, written out: every span end's [V] terms at once
    end_logp = torch.log_softmax(hidden[span_end] @ head.T, -1)  # [n, V]
    span_logp = span_sums(token_logp, span_id)
    prefix = torch.where(span_end, span_logp.gather(1, span_id.clamp_min(0)) - token_logp, 0.0)
    merged = end_logp + prefix[span_end][:, None]
    _, grad = span_terms(merged, teacher_ids[span_end], teacher_logp[span_end], match, 0.3)
    carried = (grad * merged.exp()).sum(-1)  # [n]
    # on each span's earlier tokens, the carried term of its end
    carried_of = {(b, span_id[b, t].item()): carried[e]
                  for e, (b, t) in enumerate(zip(*(i.tolist() for i in span_end.nonzero(as_tuple=True))))}
    want_grad = torch.zeros_like(token_logp)
    for b in range(2):
        for t in range(7):
            if span_id[b, t] >= 0 and not span_end[b, t]:
                want_grad[b, t] = carried_of[(b, span_id[b, t].item())]
    assert span_end.sum() == 7 and want_grad.abs().max() > 1e-3
    at_ends = TeacherLogits(hidden=hidden[span_end], head_weight=head)
    for given, chunk in [(end_logp, 2), (at_ends, 2), (at_ends, 3), (at_ends, 1), (end_logp, None)]:
        got_prefix, got_grad = span_prefix_fields(token_logp, given, span_id, span_end, teacher_ids, teacher_logp,
                                                  match, 0.3, chunk_size=chunk)
        torch.testing.assert_close(got_prefix, prefix, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("hybrid", [False, True], ids=["uld", "hybrid"])
def test_the_uld_loss_and_its_gradient_do_not_depend_on_the_chunk(hybrid: bool) -> None:
    from lightning_unified.losses.spans import span_prefix_fields

    hidden, head, targets, token_logp, span_id, span_end, teacher_ids, teacher_logp = uld_problem(seed=1)
    end_logp = torch.log_softmax(hidden[span_end] @ head.T, -1)
    match = matched_vocabulary() if hybrid else None
    prefix, prefix_grad = span_prefix_fields(token_logp, end_logp, span_id, span_end, teacher_ids, teacher_logp,
                                             match, 0.3)
    builder = (functools.partial(weight_builders.uld_hybrid, vocabulary_match=match, beta=0.3) if hybrid else weight_builders.uld)
    fields = {"span_end": span_end.double(), "span_prefix_logp": prefix, "span_prefix_grad": prefix_grad,
              "teacher_span_topk_ids": teacher_ids, "teacher_span_topk_logp": teacher_logp}
    results = []
    for chunk in (2, 3, 100):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        out = chunked_weighted_nll(h, w, targets, (span_id >= 0).double(), builder, fields=fields, chunk_size=chunk)
        results.append((out.loss.detach(), out.objective, *torch.autograd.grad(out.loss, (h, w))))
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert results[2][2].abs().max() > 1e-4
