"""Padding-free forwards: a batch's sequences laid end to end in rows of a token budget.

A batch arrives padded: prompts to the longest prompt (on the left), responses to the
longest response (on the right), so every row is ``P + R`` positions long whatever its own
length. :func:`pack` lays each sequence's real tokens (its prompt, then its response) end
to end into as few rows of at most ``max_tokens_per_row`` tokens as first-fit decreasing
finds, with position ids restarting at 0 for every sequence and attention that never
crosses a sequence's boundary. :func:`unpack` takes the packed forward's hidden states
back to the padded ``[B, R, H]`` layout of the response positions, so everything after the
forward (the loss, its normaliser, per-sequence weights) is unchanged: the same tokens, the
same gradient.

A batch whose packed rows would be no shorter than its padded ones (every sequence of one
length) goes through the padded forward: the same positions, without a mask to build.

Attention: with a FlashAttention implementation the model sees only the restarting
position ids and takes its variable-length path (no mask is built); any other
implementation gets a 4D additive block-diagonal causal mask ``[rows, 1, L, L]`` (a boolean
4D mask is not read as a mask by every implementation: eager attention adds it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """Whether forwards pack, and each row's token budget (None: the batch's longest
    sequence, so no sequence is ever split and rows are as long as the padded batch's)."""

    enabled: bool = False
    max_tokens_per_row: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"module.max_tokens_per_row must be >= 1 or null, got {self.max_tokens_per_row}")

    def describe(self, varlen: bool) -> str:
        """The run's start line for packing (``varlen``: FlashAttention's path)."""
        attention = "FlashAttention's variable-length path" if varlen else "a block-diagonal causal mask"
        budget = (f"at most {self.max_tokens_per_row} tokens" if self.max_tokens_per_row
                  else "as long as the batch's longest sequence")
        return f"packing: each forward lays the batch's sequences end to end in rows {budget}; attention through {attention}"


@dataclass(frozen=True)
class PackedBatch:
    input_ids: Tensor  # [N, L] the packed rows (pad id 0 after the last sequence of a row)
    position_ids: Tensor  # [N, L] restarting at 0 for every sequence
    segment: Tensor  # [N, L] long, which sequence of the row a position belongs to (-1 on padding)
    row: Tensor  # [B, R] long, the packed row of the position that predicts each response token
    column: Tensor  # [B, R] long, its column
    valid: Tensor  # [B, R] bool, False on response padding (nothing predicts it)
    real_tokens: int  # tokens of the batch's sequences
    padded_tokens: int  # positions of the padded layout (B x (P + R))
    # the block-diagonal masks made for this layout, by dtype (each forward of the batch reuses it)
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """:func:`block_causal_mask` of this layout in ``dtype``, made once."""
        if dtype not in self._masks:
            self._masks[dtype] = block_causal_mask(self.segment, dtype)
        return self._masks[dtype]

    @property
    def padding_fraction(self) -> float:
        """The share of the padded layout's positions that were padding."""
        return 1.0 - self.real_tokens / max(self.padded_tokens, 1)


def sequence_lengths(prompt_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(prompt lengths [B], response lengths [B]); a prompt must be left-padded and a
    response right-padded (their masks contiguous), as the collator lays them out."""
    prompt_len = prompt_mask.sum(-1)
    response_len = response_mask.sum(-1)
    P, R = prompt_mask.shape[1], response_mask.shape[1]
    columns_p = torch.arange(P, device=prompt_mask.device)
    columns_r = torch.arange(R, device=response_mask.device)
    left = columns_p[None] >= (P - prompt_len)[:, None]
    right = columns_r[None] < response_len[:, None]
    if not bool((left == prompt_mask.bool()).all() & (right == response_mask.bool()).all()):  # one host read
        raise ValueError("packing needs left-padded prompts and right-padded responses, each a contiguous run of "
                         "tokens (the collator's layout)")
    return prompt_len, response_len


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices grouped into bins of at most ``capacity`` tokens, longest first,
    each into the first bin it fits. Within a bin, sequences keep their batch order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit module.max_tokens_per_row={capacity}; "
                             f"raise it (or set it to null: the batch's longest sequence)")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
         max_tokens_per_row: int | None = None, only_if_shorter: bool = False) -> PackedBatch | None:
    """Lay the batch's sequences (prompt then response, real tokens only) end to end in rows.
    With ``only_if_shorter``, None when the packed rows would hold no fewer positions than
    the padded batch (every sequence of one length): the padded forward is then the same
    work without a mask to build or read."""
    B, P = prompt_ids.shape
    R = response_ids.shape[1]
    device = prompt_ids.device
    prompt_len, response_len = sequence_lengths(prompt_mask, response_mask)
    # one host read: where each sequence goes is host bookkeeping
    prompt_len_l, response_len_l = torch.stack([prompt_len, response_len]).tolist()
    lengths = [p + r for p, r in zip(prompt_len_l, response_len_l)]
    capacity = max_tokens_per_row or max(max(lengths), 1)
    bins = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    if only_if_shorter and len(bins) * width >= B * (P + R):
        return None
    input_ids = torch.zeros(len(bins), width, dtype=prompt_ids.dtype, device=device)
    position_ids = torch.zeros(len(bins), width, dtype=torch.long, device=device)
    segment = torch.full((len(bins), width), -1, dtype=torch.long, device=device)
    row = torch.zeros(B, R, dtype=torch.long)
    column = torch.zeros(B, R, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for s, i in enumerate(members):
            p, n = prompt_len_l[i], response_len_l[i]
            tokens = torch.cat([prompt_ids[i, P - p:], response_ids[i, :n]])
            input_ids[r, start:start + p + n] = tokens
            position_ids[r, start:start + p + n] = torch.arange(p + n, device=device)
            segment[r, start:start + p + n] = s
            # the position before response token t (the prompt's last token for t = 0) predicts it
            row[i, :n] = r
            column[i, :n] = torch.arange(start + p - 1, start + p - 1 + n)
            start += p + n
    valid = torch.arange(R)[None] < torch.tensor(response_len_l)[:, None]
    return PackedBatch(input_ids, position_ids, segment, row.to(device), column.to(device), valid.to(device),
                       real_tokens=int(sum(lengths)), padded_tokens=B * (P + R))


class _LayoutEntry:
    """One batch's layout and the four tensors it was made from, held weakly."""

    def __init__(self, tensors: tuple[Tensor, ...], settings: tuple, layout: PackedBatch | None) -> None:
        self.refs = [weakref.ref(t) for t in tensors]
        self.versions = [t._version for t in tensors]
        self.settings, self.layout = settings, layout

    def matches(self, tensors: tuple[Tensor, ...], settings: tuple) -> bool:
        return settings == self.settings and all(
            ref() is t and t._version == version for ref, t, version in zip(self.refs, tensors, self.versions))


# the layout of the batch being trained on now: one entry, dropped with the batch's prompt ids
_current: dict[str, _LayoutEntry] = {}


def batch_layout(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                 max_tokens_per_row: int | None = None, only_if_shorter: bool = False) -> PackedBatch | None:
    """:func:`pack`, made once per batch. Every forward of one training step packs the same
    four tensors (the teacher's, the reference's, the importance ratio's, the policy's): the
    first makes the layout (host bookkeeping, one read back to the host) and the others
    reuse it, with its masks. It is keyed by the tensors themselves and their version
    counters, so other tensors (a teacher's context prompts, a replayed mini-batch) or a
    tensor changed in place are packed anew, and it is dropped when the batch is."""
    tensors = (prompt_ids, prompt_mask, response_ids, response_mask)
    settings = (max_tokens_per_row, only_if_shorter)
    entry = _current.get("batch")
    if entry is not None and entry.matches(tensors, settings):
        return entry.layout
    entry = _LayoutEntry(tensors, settings, pack(*tensors, max_tokens_per_row, only_if_shorter))
    _current["batch"] = entry
    weakref.finalize(prompt_ids, _forget, entry)
    return entry.layout


def _forget(entry: _LayoutEntry) -> None:
    if _current.get("batch") is entry:
        del _current["batch"]


def block_causal_mask(segment: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, 1, L, L] additive mask: 0 where a position may attend (an earlier or the same
    position of its own sequence), the dtype's minimum elsewhere. A padding position
    attends to itself only, so no row of the softmax is empty (an empty one is NaN)."""
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    own = torch.eye(L, dtype=torch.bool, device=segment.device)[None]
    allowed = (same & causal[None] & (segment[:, :, None] >= 0)) | own
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def uses_varlen_attention(model) -> bool:
    """FlashAttention implementations read packed sequences from the position ids alone."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in implementation


def unpack(hidden: Tensor, packed: PackedBatch) -> Tensor:
    """[N, L, H] packed hidden states -> [B, R, H] at the positions that predict each
    response token, 0 on response padding."""
    out = hidden[packed.row, packed.column]  # [B, R, H]
    return out * packed.valid[..., None].to(out.dtype)
