"""A frozen teacher's distribution as the loss reads it: hidden states and its head (logits
made one chunk at a time) or logits that already exist, or several teachers' hidden states
each read through its own head. Plain data types, shared by the chunk math and the loss
driver."""

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


@dataclass(frozen=True)
class RoutedTeacherLogits:
    """Several frozen teachers, each token's distribution made by the head of the teacher
    its row was routed to, one chunk at a time (the loss reads it as it reads
    :class:`TeacherLogits`).

    ``hidden`` [..., H_max] holds each token's teacher hidden state, zero-padded to the
    widest teacher; ``group`` [...] long names the teacher of each token (an index into
    ``heads``); ``heads`` holds each teacher's (weight [V, H_g], bias [V] or None). Each
    teacher's head is used as it is: nothing [V, sum H] is ever built.
    """

    hidden: Tensor
    group: Tensor
    heads: tuple[tuple[Tensor, Tensor | None], ...]
    temperature: float = 1.0

    # the fields a caller may read as it reads TeacherLogits'
    logits = None

    def __post_init__(self) -> None:
        if self.group.shape != self.hidden.shape[:-1]:
            raise ValueError(f"RoutedTeacherLogits: group {tuple(self.group.shape)} must have hidden's token dims "
                             f"{tuple(self.hidden.shape[:-1])}")
        if self.temperature <= 0:
            raise ValueError(f"RoutedTeacherLogits.temperature must be > 0, got {self.temperature}")

    @staticmethod
    def from_rows(parts: list[tuple[Tensor, TeacherLogits]], rows: int) -> "RoutedTeacherLogits":
        """Teachers that each scored some of a batch's ``rows`` rows: ``parts`` are
        (row index [B_g], TeacherLogits with hidden [B_g, R, H_g]) with the same R and
        temperature; the result has hidden [rows, R, H_max]."""
        widest = max(t.hidden.shape[-1] for _, t in parts)
        width = parts[0][1].hidden.shape[1]
        dtype = parts[0][1].hidden.dtype
        for _, t in parts:
            dtype = torch.promote_types(dtype, t.hidden.dtype)
        device = parts[0][1].hidden.device
        hidden = torch.zeros(rows, width, widest, dtype=dtype, device=device)
        group = torch.zeros(rows, width, dtype=torch.long, device=device)
        heads = []
        for g, (index, teacher) in enumerate(parts):
            if teacher.hidden is None or teacher.hidden.shape[1] != width or teacher.temperature != parts[0][1].temperature:
                raise ValueError("RoutedTeacherLogits.from_rows: every part needs hidden [B_g, R, H_g] with one R "
                                 "and one temperature")
            hidden[index, :, : teacher.hidden.shape[-1]] = teacher.hidden.to(dtype)
            group[index] = g
            heads.append((teacher.head_weight, teacher.head_bias))
        return RoutedTeacherLogits(hidden, group, tuple(heads), parts[0][1].temperature)

    def flattened(self, leading: torch.Size) -> "RoutedTeacherLogits":
        return replace(self, hidden=flatten_tokens("teacher hidden", self.hidden, leading).detach(),
                       group=flatten_tokens("teacher group", self.group, leading))

    def rows(self, start: int, stop: int) -> "RoutedTeacherLogits":
        return replace(self, hidden=self.hidden[start:stop], group=self.group[start:stop])

    def select(self, index: Tensor) -> "RoutedTeacherLogits":
        return replace(self, hidden=self.hidden.index_select(0, index), group=self.group.index_select(0, index))

    @torch.no_grad()
    def log_probs(self, start: int, stop: int) -> Tensor:
        """[c, V] log softmax(logits / temperature) of tokens [start, stop), each from its
        own teacher's head, at least float32."""
        hidden, group = self.hidden[start:stop], self.group[start:stop]
        dtype = compute_dtype(hidden)
        for weight, _ in self.heads:
            dtype = torch.promote_types(dtype, compute_dtype(weight))
        out = hidden.new_zeros(hidden.shape[0], self.heads[0][0].shape[0], dtype=dtype)
        for g, (weight, bias) in enumerate(self.heads):
            index = (group == g).nonzero().squeeze(-1)
            if index.numel():
                logits = F.linear(hidden.index_select(0, index)[:, : weight.shape[1]].to(weight.dtype), weight, bias)
                out.index_copy_(0, index, log_softmax(logits, self.temperature, dtype))
        return out


def flatten_tokens(name: str, tensor: Tensor, leading: torch.Size) -> Tensor:
    """``tensor`` [*leading, *rest] as [N, *rest], or an error naming it when its leading dims
    are not the token dims ``leading``."""
    if tensor.shape[: len(leading)] != leading:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but its leading dims must match the "
            f"token dims {tuple(leading)} of hidden/logits"
        )
    return tensor.reshape(-1, *tensor.shape[len(leading):])
