"""A frozen teacher's distribution as the loss reads it: hidden states and its head (logits
made one chunk at a time) or logits that already exist. A plain data type, shared by the
chunk math and the loss driver."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unified.losses.token_weights import compute_dtype, log_softmax


@dataclass(frozen=True)
class TeacherLogits:
    """A frozen teacher's full-vocabulary distribution, made one chunk of tokens at a time.

    Give either ``hidden`` [N, H_t] with ``head_weight`` [V, H_t] (and ``head_bias`` [V]),
    so the teacher's logits exist one chunk at a time like the student's, or ``logits``
    [N, V] when they already exist. ``temperature`` divides the teacher's logits.
    """

    hidden: Tensor | None = None
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None
    logits: Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None or self.head_weight is None):
            raise ValueError("TeacherLogits: give either logits, or hidden together with head_weight")
        if self.temperature <= 0:
            raise ValueError(f"TeacherLogits.temperature must be > 0, got {self.temperature}")

    def flattened(self, leading: torch.Size) -> TeacherLogits:
        """The teacher with its token dims, which must equal the student's, flattened."""
        if self.logits is not None:
            return replace(self, logits=flatten_tokens("teacher logits", self.logits, leading).detach())
        return replace(self, hidden=flatten_tokens("teacher hidden", self.hidden, leading).detach())

    def rows(self, start: int, stop: int) -> TeacherLogits:
        """Entries ``start:stop`` of the first dim: sequences of an unflattened [B, R, ...]
        teacher (a mini-batch), or tokens of a flattened one (a chunk)."""
        if self.logits is not None:
            return replace(self, logits=self.logits[start:stop])
        return replace(self, hidden=self.hidden[start:stop])

    def select(self, index: Tensor) -> TeacherLogits:
        """The teacher restricted to the tokens ``index`` [M]."""
        if self.logits is not None:
            return replace(self, logits=self.logits.index_select(0, index))
        return replace(self, hidden=self.hidden.index_select(0, index))

    @torch.no_grad()
    def log_probs(self, start: int, stop: int) -> Tensor:
        """log softmax(teacher logits / temperature) for tokens [start, stop), [c, V], at
        least float32."""
        if self.logits is not None:
            logits = self.logits[start:stop]
        else:
            logits = F.linear(self.hidden[start:stop], self.head_weight, self.head_bias)
        return log_softmax(logits, self.temperature, compute_dtype(logits))


def flatten_tokens(name: str, tensor: Tensor, leading: torch.Size) -> Tensor:
    """``tensor`` [*leading, *rest] as [N, *rest], or an error naming it when its leading dims
    are not the token dims ``leading``."""
    if tensor.shape[: len(leading)] != leading:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but its leading dims must match the "
            f"token dims {tuple(leading)} of hidden/logits"
        )
    return tensor.reshape(-1, *tensor.shape[len(leading):])
