"""What a served teacher returns for a batch: each response token's log-prob and, when
asked, the teacher's top-k at that position, as the batch fields the loss already reads
(the offline cache's top-k format, and the sampled token's log-prob)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TeacherScores:
    """Right-padded like the batch's responses; padding holds id 0 and log-prob 0."""

    token_logp: Tensor  # [B, R] float32: log pi_T(y_t) of each response token
    topk_ids: Tensor | None  # [B, R, K] long: the teacher's K most likely tokens, most likely first
    topk_logp: Tensor | None  # [B, R, K] float32: their log-probs


def sequences(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
              response_mask: Tensor) -> tuple[list[list[int]], list[int]]:
    """(each row's prompt + response token ids without padding, each row's prompt length).
    Prompts are left-padded and responses right-padded, as in every batch."""
    rows, prompt_lengths = [], []
    for p_ids, p_mask, r_ids, r_mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), response_ids.cpu(),
                                            response_mask.cpu()):
        prompt = p_ids[p_mask.bool()].tolist()
        rows.append(prompt + r_ids[r_mask.bool()].tolist())
        prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


def scores_from_positions(positions: list[list[dict[int, float]]], tokens: list[list[int]], width: int, top_k: int,
                          source: str) -> TeacherScores:
    """Tensors from per-position log-prob tables.

    ``positions[b][t]`` is {token id: log-prob} at response position ``t`` of row ``b``: the
    teacher's top-k there plus the response token ``tokens[b][t]`` itself (every engine
    returns the actual token beside its top-k). ``width`` is the batch's padded response
    length; ``source`` names the teacher in errors."""
    rows = len(positions)
    token_logp = [[0.0] * width for _ in range(rows)]
    topk_ids = [[[0] * top_k for _ in range(width)] for _ in range(rows)]
    topk_logp = [[[0.0] * top_k for _ in range(width)] for _ in range(rows)]
    for b, (row, row_tokens) in enumerate(zip(positions, tokens)):
        if len(row) != len(row_tokens):
            raise RuntimeError(f"{source} returned log-probs for {len(row)} response positions of row {b}, "
                               f"which has {len(row_tokens)}")
        for t, (table, token) in enumerate(zip(row, row_tokens)):
            if token not in table:
                raise RuntimeError(f"{source} did not return the log-prob of token {token} at response position {t} "
                                   f"of row {b} (it returned ids {sorted(table)[:8]})")
            token_logp[b][t] = table[token]
            if top_k:
                best = sorted(table.items(), key=lambda item: -item[1])[:top_k]
                if len(best) < top_k:
                    raise RuntimeError(f"{source} returned {len(best)} log-probs at response position {t} of row "
                                       f"{b}, fewer than signal.top_k={top_k}")
                topk_ids[b][t] = [i for i, _ in best]
                topk_logp[b][t] = [lp for _, lp in best]
    return TeacherScores(torch.tensor(token_logp, dtype=torch.float32).reshape(rows, width),
                         torch.tensor(topk_ids, dtype=torch.long).reshape(rows, width, top_k) if top_k else None,
                         torch.tensor(topk_logp, dtype=torch.float32).reshape(rows, width, top_k) if top_k else None)
