"""The weight w_t(v) of the one loss, and the pure functions every loss path shares.

Every method trains with ``loss = -sum_{t,v} stopgrad(w_t(v)) * log pi_theta(v | context_t)``.
A weight builder returns a :class:`TokenWeights` for a chunk of tokens; it may put weight on
the batch token ``y_t`` (sparse signals), on a few vocabulary ids per token (a top-k teacher),
on the whole vocabulary (a full teacher), or on several of these at once (they add up).
Keeping the three parts apart lets a sparse signal stay ``[c]`` instead of ``[c, V]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenWeights:
    """w_t(v) for a chunk of ``c`` tokens, as parts that add up; no part carries a gradient."""

    # [c] weight on the batch token y_t (SFT, RL advantages, DFT, importance ratios)
    coef: Tensor | None = None
    # [c, K] vocabulary ids that get their own weight (a top-k teacher)
    topk_ids: Tensor | None = None
    # [c, K] the weight on each of those ids
    topk_weight: Tensor | None = None
    # [c, V] weight on every vocabulary entry (a full-vocabulary teacher, the top-k tail)
    dense: Tensor | None = None
    # [c] the real objective of each token (CE, KL, JSD, surrogate), reported beside the loss
    objective: Tensor | None = None
    # [c] a per-token factor on ``dense`` (None: 1): scaling keeps it apart, so a mask and
    # normaliser cost a [c] multiply, not a pass over [c, V] and a second [c, V] tensor
    dense_scale: Tensor | None = None
    # [c] sum_v dense(v) before ``dense_scale``, when the builder has it already (a
    # teacher's probabilities sum to 1): the logit gradient then skips a pass over [c, V]
    dense_total: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.topk_ids is None) != (self.topk_weight is None):
            raise ValueError("TokenWeights: topk_ids and topk_weight must be given together")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.requires_grad:
                # The one equation holds only if w is a constant: a weight that carries a
                # gradient would silently change the objective being optimised.
                raise ValueError(f"TokenWeights.{f.name} carries a gradient; detach it first")

    def scaled(self, scale: Tensor) -> TokenWeights:
        """Every part multiplied per token by ``scale`` [c] (mask / normaliser, ratios)."""
        s1 = scale.unsqueeze(-1)
        return TokenWeights(
            coef=None if self.coef is None else self.coef * scale,
            topk_ids=self.topk_ids,
            topk_weight=None if self.topk_weight is None else self.topk_weight * s1,
            dense=self.dense,
            objective=None if self.objective is None else self.objective * scale,
            dense_scale=None if self.dense is None else scale if self.dense_scale is None else self.dense_scale * scale,
            dense_total=self.dense_total,
        )

    def scaled_dense(self) -> Tensor | None:
        """``dense`` with its per-token factor applied, [c, V] (a new tensor when there is one)."""
        if self.dense is None or self.dense_scale is None:
            return self.dense
        return self.dense * self.dense_scale.unsqueeze(-1)

    def dense_row_sums(self) -> Tensor:
        """sum_v dense(v) per token with its factor, [c]."""
        total = self.dense_total if self.dense_total is not None else self.dense.sum(-1)
        return total if self.dense_scale is None else total * self.dense_scale

    def __add__(self, other: TokenWeights) -> TokenWeights:
        """Sum of two weights (e.g. a distillation term plus a reference penalty)."""

        def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return a if b is None else b
            return a + b

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return a if b is None else b
            return torch.cat([a, b], dim=-1)

        if self.dense is not None and other.dense is not None:
            # two dense parts: their factors are applied before they are added
            dense = dict(dense=self.scaled_dense() + other.scaled_dense(), dense_scale=None, dense_total=None)
        else:
            keep = self if other.dense is None else other
            dense = dict(dense=keep.dense, dense_scale=keep.dense_scale, dense_total=keep.dense_total)
        return replace(
            self,
            coef=add(self.coef, other.coef),
            topk_ids=cat(self.topk_ids, other.topk_ids),
            topk_weight=cat(self.topk_weight, other.topk_weight),
            objective=add(self.objective, other.objective),
            **dense,
        )

    def total(self, like: Tensor) -> Tensor:
        """sum_v w_t(v) per token, [c]; ``like`` is any [c, ...] tensor for dtype/device."""
        total = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
        if self.coef is not None:
            total = total + self.coef
        if self.topk_weight is not None:
            total = total + self.topk_weight.sum(-1)
        if self.dense is not None:
            total = total + self.dense_row_sums()
        return total


def weighted_log_likelihood(logp: Tensor, targets: Tensor, weights: TokenWeights) -> Tensor:
    """sum_v w_t(v) * logp_t(v) per token, [c]. ``logp`` [c, V] may carry a gradient."""
    out = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    if weights.coef is not None:
        out = out + weights.coef * logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if weights.topk_weight is not None:
        out = out + (weights.topk_weight * logp.gather(-1, weights.topk_ids)).sum(-1)
    if weights.dense is not None:
        # ``logp`` must be finite: 0 * -inf is nan (the logits paths guarantee it)
        dense_term = torch.linalg.vecdot(weights.dense, logp)
        out = out + (dense_term if weights.dense_scale is None else dense_term * weights.dense_scale)
    return out


def weighted_nll_logit_grad(logp: Tensor, targets: Tensor, weights: TokenWeights, *,
                            overwrite: bool = False) -> Tensor:
    """d/dz of ``-sum_v w(v) log softmax(z)(v)`` with w constant: ``p * sum_v w - w``. [c, V].

    This closed form is why the chunked loss never has to keep a chunk's logits for the
    backward pass: the gradient is known as soon as the weights are. ``overwrite`` writes
    it into ``logp``'s own memory (the caller no longer needs the log-probs): a fresh
    [c, V] tensor per chunk costs more than the pass that fills it on a CPU.
    """
    # in place on one [c, V] tensor: each extra pass over the vocabulary costs time
    grad = (logp.exp_() if overwrite else logp.exp()).mul_(weights.total(logp).unsqueeze(-1))
    if weights.dense is not None:
        if weights.dense_scale is None:
            grad.sub_(weights.dense)
        else:  # one pass, no [c, V] product
            grad.addcmul_(weights.dense, weights.dense_scale.unsqueeze(-1), value=-1)
    if weights.topk_weight is not None:
        grad.scatter_add_(-1, weights.topk_ids, -weights.topk_weight)
    if weights.coef is not None:
        grad.scatter_add_(-1, targets.unsqueeze(-1), -weights.coef.unsqueeze(-1))
    return grad


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (a log-softmax over 150k logits in bf16 loses the
    small probabilities), the input's own precision above that."""
    return torch.promote_types(tensor.dtype, torch.float32)


def log_softmax(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    logits = logits.to(dtype)
    if temperature != 1.0:  # skip a pass over [c, V] in the common case
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)

