"""The compiled chunk math (``chunked_weighted_nll(compile=True)``) gives what the eager path
gives, for every weight builder, and trains a real model to the same parameters.

Inductor's CPU backend compiles here; on a GPU it emits Triton kernels from the same graph
(``scripts/benchmark_objective.py --compile`` measures both there).
"""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import chunked_weighted_nll
from tests.builder_cases import CASE_IDS, CASES, Case
from tests.conftest import make_problem

# float64 problem: compiled and eager differ only by the order of floating-point sums
TOL = dict(rtol=1e-9, atol=1e-12)


def _loss(case: Case, compile: bool, chunk_size: int):
    p = make_problem(seed=7)
    scale = token_scale(p.mask, "token_mean")
    out = chunked_weighted_nll(
        p.hidden, p.head, p.targets, scale, case.weight_fn, fields=case.fields(p), teacher=case.teacher(p),
        temperature=case.temperature, chunk_size=chunk_size, compile=compile,
    )
    return out, torch.autograd.grad(out.loss, p.leaves())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_equals_eager(case: Case) -> None:
    # 17 kept tokens in chunks of 5: three full chunks and one of 2, one compiled graph for all
    eager, eager_grads = _loss(case, compile=False, chunk_size=5)
    compiled, compiled_grads = _loss(case, compile=True, chunk_size=5)
    for got, want in zip((*compiled, *compiled_grads), (*eager, *eager_grads)):
        torch.testing.assert_close(got, want, **TOL)


def test_compiled_bf16_head_with_bias_equals_eager() -> None:
    """Half-precision heads: the compiled graph casts the gradient to bf16 and sums the
    bias gradient in float32, as the eager path does."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(23, 16, generator=gen).bfloat16().requires_grad_()
    head = (torch.randn(301, 16, generator=gen) / 4).bfloat16().requires_grad_()
    bias = torch.randn(301, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 301, (23,), generator=gen)
    scale = torch.full((23,), 1 / 23)
    results = []
    for compile in (False, True):
        out = chunked_weighted_nll(hidden, head, targets, scale, weight_builders.dft, head_bias=bias, chunk_size=8,
                                   compile=compile)
        results.append((out.loss, out.objective, out.target_logp, *torch.autograd.grad(out.loss, (hidden, head, bias))))
    for got, want in zip(*reversed(results)):
        assert got.dtype == want.dtype
        # bf16 gradients: one rounding of the same float32 value, which may land a unit apart
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4)


def test_module_trains_the_same_with_a_compiled_loss(tmp_path) -> None:
    """Three SGD steps of off-policy distillation on a tiny Llama through Lightning: the
    compiled loss gives the eager run's parameters. (SGD, not Adam: Adam divides by the
    gradient's own size, so float32 rounding in a near-zero gradient entry becomes a step of
    lr in either direction, in eager runs too.)"""
    from lightning_unified.specs import Dense, OffPolicy
    from tests.lightning_helpers import quiet_trainer, save_tiny_teacher, tiny_datamodule, tiny_module

    teacher = save_tiny_teacher(tmp_path / "teacher")
    trained = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = tiny_module(OffPolicy(), Dense(teacher=teacher))
        module.compile_loss = compile
        module.optimizer_factory = functools.partial(torch.optim.SGD, lr=0.5)
        start = module.policy.lm_head.weight.detach().clone()
        quiet_trainer(max_steps=3, limit_val_batches=0).fit(module, datamodule=tiny_datamodule())
        trained.append(module.policy.state_dict())
        assert (trained[-1]["lm_head.weight"] - start).abs().max() > 1e-3  # the steps really moved it
    for name, want in trained[0].items():
        torch.testing.assert_close(trained[1][name], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_under_bf16_autocast_matches_a_plain_autocast_loop(compile: bool) -> None:
    """Under the trainer's bf16 autocast the head's logits are bf16 and so is the gradient the
    chunk hands the two matmuls; the result is the plain autocast loop's, up to bf16."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 32, generator=gen).requires_grad_()  # float32, as a norm's output under autocast
    head = (torch.randn(211, 32, generator=gen) / 6).requires_grad_()
    targets = torch.randint(0, 211, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy((hidden @ head.T).float(), targets)
        want = torch.autograd.grad(plain, (hidden, head))
        out = chunked_weighted_nll(hidden, head, targets, torch.full((40,), 1 / 40), weight_builders.indicator,
                                   chunk_size=16, compile=compile)
        got = torch.autograd.grad(out.loss, (hidden, head))
    torch.testing.assert_close(out.objective, plain.detach(), rtol=1e-3, atol=1e-3)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)
