"""The one place where gradients flow: ``-sum stopgrad(w) * log pi_theta / normaliser``.

:func:`chunked_weighted_nll` computes it from the policy's final hidden states and its
output projection, a chunk of tokens at a time. The gradient of each chunk is computed in the
forward pass from the closed form ``p * sum(w) - w`` (as fused linear cross-entropy kernels
do), so no ``[tokens, vocab]`` tensor larger than one chunk ever exists, in the forward pass
or in the backward pass. Vocabularies of 150k tokens are normal. The vocabulary-sized math of
one chunk is :func:`lightning_unified.losses.chunk_math.chunk_math`, eager or compiled. The
tests check it against plain autograd over full logits (``tests/plain_loss.py``).

A weight builder (see :mod:`lightning_unified.losses.weight_builders`) is called once per chunk as
``weight_fn(student_logp [c, V], targets [c], **fields)``, where ``fields`` are the per-token
tensors given to the loss sliced to the chunk, plus ``teacher_logp`` [c, V] when a
:class:`TeacherLogits` is given. ``student_logp`` is detached: builders only read it.

What the chunked path keeps between forward and backward is the gradient itself: [N, H]
for the hidden states and a [V, H] accumulator for the head (float32 for half-precision
heads), never logits. Under ``torch.no_grad`` it computes only the loss.

``token_scale`` [N] multiplies every weight of a token; it carries the padding mask and the
loss normaliser (see :mod:`lightning_unified.losses.aggregation`). Tokens whose scale is zero are
dropped before any vocabulary-sized work, so prompts and padding cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unified.losses.chunk_math import WeightFn, chunk_math, chunk_weights, compiled_chunk_math
from lightning_unified.losses.teacher_logits import TeacherLogits, flatten_tokens
from lightning_unified.losses.token_weights import weighted_log_likelihood
from lightning_unified.losses.token_weights import compute_dtype as _compute_dtype
from lightning_unified.losses.token_weights import log_softmax as _log_softmax

MIN_AUTO_CHUNK = 128
# On a CPU, a chunk whose float32 logits fit in this many bytes is always allowed: below it,
# chunking saves no memory worth its per-chunk passes and Python (a 4k vocabulary, 512
# tokens: four 128-token chunks made the SFT step 1.18x a plain loop's, one chunk about 1.05x)
CPU_SMALL_LOGITS_BYTES = 32 << 20
# On an accelerator, one chunk's float32 logits may take this share of the device's memory
# (within [ACCELERATOR_MIN_CHUNK, ACCELERATOR_MAX_CHUNK] tokens): on an H100 or H200 and a
# 150k vocabulary that is 4096-8192 tokens, where the loss head's time meets the plain
# loop's (measured on an H200: 128-token chunks 1.5-2x slower, 4096-token 1.03-1.16x).
ACCELERATOR_CHUNK_SHARE = 1 / 32
ACCELERATOR_MIN_CHUNK = 1024
ACCELERATOR_MAX_CHUNK = 8192


def auto_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int, device: torch.device | str | None = None) -> int:
    """Tokens per chunk of the loss, by device.

    CPU: one chunk's [c, V] logits about as large as the larger of the [N, H] hidden states
    (the rule Liger-Kernel's fused linear losses use) and the [V, H] head, so the loss adds
    no more than one activation's or one head gradient's worth of memory; a power of two, at
    least MIN_AUTO_CHUNK tokens. The head's bound exists because every chunk reads and
    writes the [V, H] gradient accumulator once: chunks of fewer than H tokens spend more
    time on it than on their logits (measured on a 2-core CPU, vocabulary 131,072, hidden
    256: chunks of 128 tokens made the SFT step 1.11x a plain loop's, chunks of 256 1.05x).
    A small vocabulary's chunk may always hold ``CPU_SMALL_LOGITS_BYTES`` of logits. A GPU: a memory budget for one
    chunk's float32 logits (``ACCELERATOR_CHUNK_SHARE`` of the device), because there many
    small launches cost more than the memory saves; never more than the tokens there are."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return accelerator_chunk_size(num_tokens, vocab_size, torch.cuda.get_device_properties(device).total_memory)
    ratio = -(-vocab_size // max(hidden_size, 1))  # ceil(V / H)
    small = CPU_SMALL_LOGITS_BYTES // (4 * max(vocab_size, 1))
    target = max(1, -(-num_tokens // ratio), hidden_size, small)
    return max(MIN_AUTO_CHUNK, 1 << (target - 1).bit_length())


def accelerator_chunk_size(num_tokens: int, vocab_size: int, device_bytes: int) -> int:
    """Tokens whose float32 logits fill ``ACCELERATOR_CHUNK_SHARE`` of ``device_bytes``, a
    multiple of 128 within the accelerator bounds, and no more than ``num_tokens``."""
    budget = int(device_bytes * ACCELERATOR_CHUNK_SHARE) // (4 * max(vocab_size, 1))
    chunk = min(max(budget, ACCELERATOR_MIN_CHUNK), ACCELERATOR_MAX_CHUNK) // 128 * 128
    return max(1, min(chunk, num_tokens))


class WeightedNLL(NamedTuple):
    """What the loss returns."""

    # scalar surrogate loss, the only tensor that carries a gradient
    loss: Tensor
    # scalar real objective (CE, KL, JSD, ...) aggregated with the same normaliser; detached
    objective: Tensor
    # [N] log pi_theta(y_t) of every token under the current policy (0 where scale == 0);
    # detached, for importance-ratio diagnostics without another forward pass
    target_logp: Tensor
    # [N] each token's share of ``objective`` (0 where scale == 0); detached, for the
    # objective of a subset of rows (each teacher's, with several)
    token_objective: Tensor | None = None
    # [N] the policy's entropy at each token, at the loss temperature (0 where scale == 0);
    # detached, None unless asked for (``entropy=True``): a diagnostic, never a gradient
    token_entropy: Tensor | None = None


def _kept_tokens(
    rows: Tensor,
    targets: Tensor,
    token_scale: Tensor,
    fields: dict[str, Tensor],
    teacher: TeacherLogits | None,
    vocab_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor], TeacherLogits | None]:
    """Flatten to tokens and keep only those with a nonzero scale (the ones in the loss)."""
    leading = rows.shape[:-1]
    targets = flatten_tokens("targets", targets, leading)
    token_scale = flatten_tokens("token_scale", token_scale, leading).detach()
    if not token_scale.is_floating_point():
        raise ValueError(f"token_scale must be a floating-point tensor, got {token_scale.dtype}")
    flat_fields = {k: flatten_tokens(f"fields[{k!r}]", v, leading).detach() for k, v in fields.items()}

    keep = (token_scale != 0).nonzero().squeeze(-1)
    targets = targets.index_select(0, keep)
    out_of_range = (targets < 0) | (targets >= vocab_size)
    message = (f"at a position with nonzero token_scale; ids must lie in [0, {vocab_size}) wherever the loss is "
               f"computed (mask ignored positions with scale 0)")
    if targets.device.type == "cpu":
        # on a CPU a read back stalls nothing: name the id
        if out_of_range.any():
            raise ValueError(f"targets hold token id {targets[out_of_range][0].item()} {message}")
    else:
        # on an accelerator, checked on the device and never read back on the hot path: a bad
        # id surfaces as a device-side assert with this message at the next sync
        torch._assert_async(~out_of_range.any(), f"targets hold a token id outside the vocabulary {message}")
    kept_fields = {k: v.index_select(0, keep) for k, v in flat_fields.items()}
    kept_teacher = None if teacher is None else teacher.flattened(leading).select(keep)
    return keep, rows.reshape(-1, rows.shape[-1]), targets, token_scale.index_select(0, keep), kept_fields, kept_teacher


@dataclass(frozen=True)
class _ChunkPlan:
    """Everything the chunked loss needs besides the differentiable inputs."""

    targets: Tensor
    token_scale: Tensor
    fields: dict[str, Tensor]
    teacher: TeacherLogits | None
    weight_fn: WeightFn
    temperature: float
    chunk_size: int
    # False under torch.no_grad (validation, metrics): skip the two gradient matmuls. The
    # Function cannot ask itself: inside forward, grad mode is always off.
    grad_enabled: bool
    # the per-chunk math through torch.compile (see lightning_unified.losses.chunk_math)
    compile: bool = False
    # each token's entropy too, from the chunk's log-probs (train/entropy)
    entropy: bool = False


class _ChunkedWeightedNLLFunction(torch.autograd.Function):
    """Loss and its gradient in one pass over chunks; backward only scales the stored grads."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, plan: _ChunkPlan):
        need_hidden, need_weight, need_bias = (need and plan.grad_enabled for need in ctx.needs_input_grad[:3])
        num_tokens = hidden.shape[0]
        # every row is written by its chunk: no zero-fill
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators: a sum over many chunks in bf16 would lose the small ones. The
        # first chunk writes the [V, H] head gradient, the others add to it in place
        acc = _compute_dtype(hidden)
        grad_weight = None
        grad_bias = torch.zeros_like(head_bias, dtype=acc) if need_bias else None
        loss = hidden.new_zeros((), dtype=acc)
        token_objective = hidden.new_zeros(num_tokens, dtype=acc)
        target_logp = hidden.new_zeros(num_tokens, dtype=acc)
        # an empty tensor when not asked for: a Function's outputs are tensors
        token_entropy = hidden.new_zeros(num_tokens if plan.entropy else 0, dtype=acc)

        math = compiled_chunk_math() if plan.compile else chunk_math
        for start in range(0, num_tokens, plan.chunk_size):
            stop = min(start + plan.chunk_size, num_tokens)
            h = hidden[start:stop]  # [c, H]
            chunk = math(
                h, head_weight, head_bias,
                plan.targets[start:stop],
                plan.token_scale[start:stop],
                {k: v[start:stop] for k, v in plan.fields.items()},
                None if plan.teacher is None else plan.teacher.rows(start, stop),
                weight_fn=plan.weight_fn,
                temperature=plan.temperature,
                with_grad=need_hidden or need_weight or need_bias,
                bias_grad=need_bias,
                with_entropy=plan.entropy,
            )
            loss += chunk.loss
            if plan.entropy:
                token_entropy[start:stop] = chunk.entropy
            token_objective[start:stop] = chunk.objective
            target_logp[start:stop] = chunk.target_logp
            if need_bias:
                grad_bias += chunk.grad_bias
            if need_hidden:
                grad_hidden[start:stop] = chunk.grad_logits @ head_weight
            if need_weight and grad_weight is None:
                grad_weight = (chunk.grad_logits.t() @ h).to(acc)
            elif need_weight:
                if chunk.grad_logits.dtype == acc:
                    # in place: the [V, H] accumulator is read and written once per chunk,
                    # not written as a product and then added (twice the memory traffic,
                    # which on a CPU is most of a thin chunk's cost)
                    grad_weight.addmm_(chunk.grad_logits.t(), h)
                else:
                    grad_weight += (chunk.grad_logits.t() @ h).to(acc)

        if need_weight:
            # no chunk at all (nothing in the loss): the head's gradient is zero
            grad_weight = (torch.zeros_like(head_weight) if grad_weight is None
                           else grad_weight.to(head_weight.dtype))
        if need_bias:
            grad_bias = grad_bias.to(head_bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(token_objective, target_logp, token_entropy)
        return loss, token_objective, target_logp, token_entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_token_objective: Tensor, _grad_target_logp: Tensor,
                 _grad_token_entropy: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = [
            grad * grad_loss.to(grad.dtype) if needed else None
            for grad, needed in zip((grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad[:3])
        ]
        return *grads, None


def _check_common(temperature: float, chunk_size: int | None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def chunked_weighted_nll(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    token_scale: Tensor,
    weight_fn: WeightFn,
    *,
    head_bias: Tensor | None = None,
    fields: dict[str, Tensor] | None = None,
    teacher: TeacherLogits | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compile: bool = False,
    entropy: bool = False,
) -> WeightedNLL:
    """The one loss from final hidden states [..., H] and the output projection [V, H].

    ``targets`` and ``token_scale`` have the token dims of ``hidden``; ``fields`` hold
    per-token tensors [..., *] for the weight builder; ``temperature`` divides the student's
    logits (the gradient includes its 1/temperature). ``chunk_size`` defaults to
    :func:`auto_chunk_size` for the device the hidden states are on. ``compile`` runs the
    per-chunk vocabulary math through ``torch.compile`` (fused kernels; the first call of
    each weight builder compiles it). ``entropy`` adds the policy's entropy at each token
    (``token_entropy``), from each chunk's log-softmax: one more pass over the chunk.
    """
    _check_common(temperature, chunk_size)
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head_weight must be [vocab, hidden={hidden.shape[-1]}], got {tuple(head_weight.shape)}"
        )
    keep, flat_hidden, targets, scale, fields, teacher = _kept_tokens(
        hidden, targets, token_scale, fields or {}, teacher, head_weight.shape[0]
    )
    if chunk_size is None:
        chunk_size = auto_chunk_size(targets.shape[0], head_weight.shape[0], head_weight.shape[1], hidden.device)
    plan = _ChunkPlan(targets, scale, fields, teacher, weight_fn, temperature, chunk_size, torch.is_grad_enabled(),
                      compile, entropy)
    loss, kept_objective, kept_logp, kept_entropy = _ChunkedWeightedNLLFunction.apply(
        flat_hidden.index_select(0, keep), head_weight, head_bias, plan
    )
    target_logp = kept_logp.new_zeros(flat_hidden.shape[0]).index_copy(0, keep, kept_logp)
    token_objective = kept_objective.new_zeros(flat_hidden.shape[0]).index_copy(0, keep, kept_objective)
    token_entropy = (kept_entropy.new_zeros(flat_hidden.shape[0]).index_copy(0, keep, kept_entropy)
                     .reshape(hidden.shape[:-1]) if entropy else None)
    return WeightedNLL(loss, kept_objective.sum(), target_logp.reshape(hidden.shape[:-1]),
                       token_objective.reshape(hidden.shape[:-1]), token_entropy)


def _logit_chunks(hidden: Tensor, head_weight: Tensor, head_bias: Tensor | None, temperature: float,
                  chunk_size: int | None):
    """(start, stop, logits / temperature [c, V] at least float32) over the flattened tokens
    of ``hidden``, one chunk at a time: the no-grad passes below never hold [N, V]."""
    _check_common(temperature, chunk_size)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        chunk_size = auto_chunk_size(flat_hidden.shape[0], head_weight.shape[0], head_weight.shape[1])
    acc = _compute_dtype(hidden)
    for start in range(0, flat_hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, flat_hidden.shape[0])
        logits = F.linear(flat_hidden[start:stop], head_weight, head_bias).to(acc)
        yield start, stop, logits / temperature if temperature != 1.0 else logits


@torch.no_grad()
def target_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    *,
    head_bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """log pi(y_t) for every token, [...], chunked and without a gradient.

    Sequence-level importance ratios need the whole sequence's log-probs before any token's
    weight is known; this extra pass over the head is paid only by them. A teacher's
    sampled-token log-probs come from the same pass.
    """
    flat_targets = targets.reshape(-1).clamp_min(0)
    out = torch.empty(flat_targets.shape[0], dtype=_compute_dtype(hidden), device=hidden.device)
    for start, stop, logits in _logit_chunks(hidden, head_weight, head_bias, temperature, chunk_size):
        out[start:stop] = logits.gather(-1, flat_targets[start:stop, None]).squeeze(-1) - logits.logsumexp(-1)
    return out.reshape(targets.shape)


@torch.no_grad()
def topk_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    k: int,
    *,
    head_bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k most likely tokens and their log-probs, ([..., k] ids, [..., k] log-probs),
    chunked: what a top-k teacher hands the loss (or an offline cache stores)."""
    vocab_size = head_weight.shape[0]
    if not 0 < k <= vocab_size:
        raise ValueError(f"top-k needs 0 < k <= vocabulary size {vocab_size}, got {k}")
    num_tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    ids = torch.empty(num_tokens, k, dtype=torch.long, device=hidden.device)
    logp = torch.empty(num_tokens, k, dtype=_compute_dtype(hidden), device=hidden.device)
    for start, stop, logits in _logit_chunks(hidden, head_weight, head_bias, temperature, chunk_size):
        logp[start:stop], ids[start:stop] = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return ids.reshape(*hidden.shape[:-1], k), logp.reshape(*hidden.shape[:-1], k)
