"""One chunk of the one loss: hidden states in; loss, objective, log-probs and logit gradient out.

Everything the chunked loss does over the vocabulary happens here, from the head's matmul
to just before the two gradient matmuls: log-softmax, the teacher's log-softmax, the
weight builder, the weighted log-likelihood and the closed-form logit gradient
``p * sum(w) - w``.
In eager PyTorch that is several passes over a [c, V] float32 tensor, each its own kernel;
on a GPU those passes, not the matmuls, are what makes small chunks slow.

:func:`compiled_chunk_math` is the same function through ``torch.compile``: the compiler
fuses the passes (reading the half-precision logits once, writing the gradient once in the
head's dtype), as hand-written fused linear-cross-entropy kernels do, but for every weight
builder, sparse, top-k and dense alike, without a kernel per signal. It is exact up to
float reassociation; ``tests/test_compiled_chunk.py`` compares it with this eager path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unified.losses.teacher_logits import TeacherLogits
from lightning_unified.losses.token_weights import (
    TokenWeights,
    compute_dtype,
    log_softmax,
    weighted_log_likelihood,
    weighted_nll_logit_grad,
)

WeightFn = Callable[..., TokenWeights]


class ChunkResult(NamedTuple):
    # scalar: -sum_t sum_v w_t(v) log pi(v | t) over the chunk (already scaled)
    loss: Tensor
    # [c] each token's real objective, scaled as its loss is (0 when the builder reports none)
    objective: Tensor
    # [c] log pi(y_t) at the loss temperature
    target_logp: Tensor
    # [c, V] d loss / d logits in the logits' dtype (None when no gradient is wanted)
    grad_logits: Tensor | None
    # [V] the same summed over tokens, in the compute dtype (only for a head with a bias)
    grad_bias: Tensor | None
    # [c] the policy's entropy -sum_v p log p at the loss temperature (only when asked for)
    entropy: Tensor | None = None


def chunk_weights(weight_fn: WeightFn, logp: Tensor, targets: Tensor, scale: Tensor, fields: dict[str, Tensor],
                  teacher_logp: Tensor | None) -> TokenWeights:
    """The chunk's weights: the builder on the chunk's log-probs [c, V], targets [c] and
    per-token fields, with the teacher's log-probs [c, V] when there is a teacher, scaled by
    the chunk's mask and normaliser ``scale`` [c]; no part is ever a view of ``logp``, which
    the chunk math then overwrites. Every loss path builds its weights here."""
    builder_fields = dict(fields)
    if teacher_logp is not None:
        builder_fields["teacher_logp"] = teacher_logp
    weights = weight_fn(logp, targets, **builder_fields).scaled(scale.to(logp.dtype))
    # scaling keeps a dense part as the builder made it (its factor apart): one that is the
    # log-probs' own memory is copied, or the gradient written over them would change it.
    # Eager only: compiled, the gradient never overwrites the log-probs
    if (weights.dense is not None and not torch.compiler.is_compiling()
            and weights.dense.untyped_storage().data_ptr() == logp.untyped_storage().data_ptr()):
        weights = replace(weights, dense=weights.dense.clone())
    return weights


def chunk_math(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    targets: Tensor,
    scale: Tensor,
    fields: dict[str, Tensor],
    teacher: TeacherLogits | None,
    *,
    weight_fn: WeightFn,
    temperature: float,
    with_grad: bool,
    bias_grad: bool,
    with_entropy: bool = False,
) -> ChunkResult:
    """The loss terms of ``c`` tokens from their final hidden states [c, H] and the head.

    ``targets`` [c], ``scale`` [c] (mask and normaliser), ``fields`` per-token tensors for
    the builder [c, *], ``teacher`` the chunk's teacher (its own temperature) or None.
    ``with_grad`` False skips the gradient (no_grad evaluation); ``with_entropy`` adds each
    token's entropy, read from the log-probs the loss makes anyway. The logits are made here,
    not by the caller, so that the raw [c, V] tensor is freed as soon as its log-softmax
    exists (a caller's reference would keep it alive through the whole chunk)."""
    logits = F.linear(hidden, head_weight, head_bias)  # [c, V]: bf16 under bf16 autocast
    # the gradient goes to the two matmuls in the logits' dtype: under autocast they run in
    # bf16 anyway, and a float32 [c, V] gradient would be written, then cast twice
    grad_dtype = logits.dtype
    acc = compute_dtype(logits)
    logp = log_softmax(logits, temperature, acc)  # [c, V]
    del logits
    weights = chunk_weights(weight_fn, logp, targets, scale, fields,
                            None if teacher is None else teacher.log_probs(0, hidden.shape[0]))
    loss = -weighted_log_likelihood(logp, targets, weights).sum()
    objective = weights.objective if weights.objective is not None else loss.new_zeros(targets.shape[0])
    target_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [c]
    # before the gradient overwrites the log-probs: one [c, V] temporary, never [N, V]
    entropy = torch.exp(logp).mul_(logp).sum(-1).neg_() if with_entropy else None  # [c]
    if not with_grad:
        return ChunkResult(loss, objective, target_logp, None, None, entropy)
    # the log-probs are dead from here on, so their memory takes the gradient: the weights
    # are never a view of them (chunk_weights sees to it). Eager
    # only: the compiler plans its own buffers.
    grad = weighted_nll_logit_grad(logp, targets, weights, overwrite=not torch.compiler.is_compiling())  # [c, V]
    del logp, weights
    if temperature != 1.0:
        grad.div_(temperature)
    grad_bias = grad.sum(0) if bias_grad else None
    return ChunkResult(loss, objective, target_logp, grad.to(grad_dtype), grad_bias, entropy)


_COMPILED: Callable[..., ChunkResult] | None = None


def compiled_chunk_math() -> Callable[..., ChunkResult]:
    """:func:`chunk_math` through ``torch.compile``, built once per process.

    ``dynamic=True``: the last chunk of every step has another length, and responses vary;
    one graph serves every length instead of a recompile per shape. Each weight builder
    (and each setting bound into it) is its own graph, compiled on first use."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(chunk_math, dynamic=True)
    return _COMPILED
