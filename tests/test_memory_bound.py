"""No [tokens x vocab] tensor larger than one chunk exists, in the forward or backward pass.

Every tensor any aten op produces is recorded by a dispatch mode; the largest must fit in
one chunk's [chunk, V]. The same probe on the full-logits fallback sees [N, V], which shows
the probe can fail.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import TeacherLogits, chunked_weighted_nll
from tests.plain_loss import weighted_nll_from_logits

TOKENS, WIDTH, VOCAB, CHUNK = 384, 8, 2048, 16


class LargestTensor(TorchDispatchMode):
    """Records the largest element count among the outputs of every op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, TOKENS // 2, WIDTH, generator=gen).requires_grad_()
    head = torch.randn(VOCAB, WIDTH, generator=gen).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=gen)
    teacher = TeacherLogits(hidden=torch.randn(2, TOKENS // 2, WIDTH + 4, generator=gen), head_weight=torch.randn(VOCAB, WIDTH + 4, generator=gen))
    topk_logp, topk_ids = torch.log_softmax(torch.randn(2, TOKENS // 2, VOCAB, generator=gen), -1).topk(8)
    return hidden, head, targets, teacher, {"teacher_topk_ids": topk_ids, "teacher_topk_logp": topk_logp}


BUILDERS = {
    "sft": (weight_builders.indicator, False, False),
    "forward_kl": (weight_builders.forward_kl, True, False),
    "reverse_kl": (weight_builders.reverse_kl, True, False),
    "jsd": (partial(weight_builders.jsd, beta=0.5), True, False),
    "forward_kl_topk": (weight_builders.forward_kl_topk, False, True),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_chunked_loss_never_holds_more_than_one_chunk_of_vocab(name: str) -> None:
    weight_fn, needs_teacher, needs_topk = BUILDERS[name]
    hidden, head, targets, teacher, topk = _inputs()
    scale = token_scale(torch.ones(targets.shape), "token_mean")
    with LargestTensor() as probe:
        out = chunked_weighted_nll(
            hidden, head, targets, scale, weight_fn,
            teacher=teacher if needs_teacher else None, fields=topk if needs_topk else {}, chunk_size=CHUNK,
        )
        out.loss.backward()
    assert hidden.grad is not None and head.grad is not None
    assert probe.largest <= CHUNK * VOCAB, f"a tensor of {probe.largest} elements exceeds one chunk ({CHUNK * VOCAB})"


def test_probe_sees_full_logits() -> None:
    hidden, head, targets, _, _ = _inputs()
    scale = token_scale(torch.ones(targets.shape), "token_mean")
    with LargestTensor() as probe:
        logits = hidden @ head.T
        out = weighted_nll_from_logits(logits, targets, scale, weight_builders.indicator, chunk_size=CHUNK)
        out.loss.backward()
    assert probe.largest >= TOKENS * VOCAB


def test_default_chunk_keeps_logits_near_the_size_of_the_hidden_states() -> None:
    from lightning_unified.losses.objective import auto_chunk_size

    # a 150k-vocabulary model of hidden 4096: [4096, V] per chunk, the head's own size
    assert auto_chunk_size(16384, 151936, 4096) == 4096
    # a narrow model with many tokens: the hidden states' size bounds it, [N / ceil(V / H), V]
    assert auto_chunk_size(1 << 20, 131072, 256) == 2048
    assert auto_chunk_size(512, 131072, 256) == 256  # the benchmark's 131k shape: the head's size
    assert auto_chunk_size(300, 65536, 8) == 128  # at least MIN_AUTO_CHUNK: tiny chunks waste matmul time
    assert auto_chunk_size(16384, 151936, 4096, "cpu") == 4096  # "cpu" is the default
    # a small vocabulary: a chunk may hold 32 MiB of float32 logits (4k vocabulary: 2048 tokens),
    # below which chunking saves no memory worth its passes
    assert auto_chunk_size(512, 4096, 128) == 2048
    assert auto_chunk_size(10, 13, 8) == 1 << 20
    # the default chunks a 64k vocabulary (the small-vocabulary allowance is 128 tokens there)
    wide_vocab = 65536
    hidden, _, targets, _, _ = _inputs()
    head = torch.randn(wide_vocab, WIDTH, generator=torch.Generator().manual_seed(1)).requires_grad_()
    targets = targets % wide_vocab
    scale = token_scale(torch.ones(targets.shape), "token_mean")
    with LargestTensor() as probe:
        chunked_weighted_nll(hidden, head, targets, scale, weight_builders.indicator).loss.backward()
    assert probe.largest <= auto_chunk_size(TOKENS, wide_vocab, WIDTH) * wide_vocab < TOKENS * wide_vocab


def test_accelerator_chunks_fill_a_memory_budget() -> None:
    from lightning_unified.losses.objective import accelerator_chunk_size

    gib = 1 << 30
    assert accelerator_chunk_size(16384, 151936, 80 * gib) == 4352  # an H100: [4352, 152k] float32 = 2.5 GiB
    assert accelerator_chunk_size(16384, 151936, 141 * gib) == 7680  # an H200
    assert accelerator_chunk_size(300, 151936, 141 * gib) == 300  # never more than the tokens there are
    assert accelerator_chunk_size(1 << 20, 32000, 141 * gib) == 8192  # a small vocabulary: the upper bound
    assert accelerator_chunk_size(1 << 20, 262144, 24 * gib) == 1024  # a small card: the lower bound


class MatmulCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_no_grad_skips_the_gradient_matmuls() -> None:
    """Under no_grad (validation) only the logits are computed: one matmul per chunk, not three."""
    hidden, head, targets, _, _ = _inputs()
    scale = token_scale(torch.ones(targets.shape), "token_mean")
    chunks = TOKENS // CHUNK
    with MatmulCount() as counted:
        with_grad = chunked_weighted_nll(hidden, head, targets, scale, weight_builders.indicator, chunk_size=CHUNK)
    assert counted.calls == 3 * chunks
    with MatmulCount() as counted, torch.no_grad():
        without = chunked_weighted_nll(hidden, head, targets, scale, weight_builders.indicator, chunk_size=CHUNK)
    assert counted.calls == chunks
    torch.testing.assert_close(without.loss, with_grad.loss.detach())
    assert not without.loss.requires_grad
