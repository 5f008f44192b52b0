"""Preference pairs (DPO, IPO, SimPO) as sequence-level weights on ``grad log pi``.

Each loss is a function ``f(margin)`` of one pair's margin, where the margin is the chosen
response's score minus the rejected one's, and a score is a sum (DPO) or a mean (IPO,
SimPO) of token log-probs, less the reference's where there is one. So

    -grad f = g * (grad score_chosen - grad score_rejected),   g = -f'(margin),

which is the one equation with weight ``+g`` (or ``+g / length``) on every chosen token and
``-g`` on every rejected one. These functions compute g and f from detached log-probs; the
loss applies them through :func:`lightning_unified.losses.weight_builders.preference`.

Rows come in groups of ``group_size`` consecutive rows sharing a prompt; ``preference``
[B] marks one chosen row (+1) and one rejected row (-1) per group, or no row (an unusable
group, e.g. every sample got the same reward), whose rows get weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AVERAGED = {"dpo": False, "ipo": True, "simpo": True}


@dataclass(frozen=True)
class PreferenceTerms:
    weight: Tensor  # [B, R] the pair's g (over the length, for averaged scores), signed by chosen / rejected
    loss: Tensor  # [B, R] the pair's loss divided over the pair's tokens: summed, it is the pair's loss
    pair_loss: Tensor  # [N] each usable pair's loss
    margin: Tensor  # [N] each usable pair's margin
    chosen_score: Tensor  # [N] the chosen response's score (DPO's implicit reward over beta)
    rejected_score: Tensor  # [N]


def pair_rows(preference: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(chosen rows [N], rejected rows [N]) of the usable groups, as row indices.

    A group is usable when it holds exactly one +1 and one -1."""
    if group_size < 2 or preference.numel() % group_size:
        raise ValueError(f"{preference.numel()} rows do not split into preference groups of {group_size} "
                         f"(a pair needs at least 2 responses per prompt)")
    groups = preference.reshape(-1, group_size)  # [P, G]
    usable = ((groups == 1).sum(-1) == 1) & ((groups == -1).sum(-1) == 1)  # [P]
    offsets = torch.arange(groups.shape[0], device=preference.device) * group_size
    chosen = (offsets + (groups == 1).float().argmax(-1))[usable]
    rejected = (offsets + (groups == -1).float().argmax(-1))[usable]
    return chosen, rejected


def sequence_scores(token_logp: Tensor, mask: Tensor, reference_logp: Tensor | None, *, average: bool) -> Tensor:
    """[B] the sum (or mean) over each response's tokens of log pi - log pi_ref (or log pi)."""
    mask = mask.to(token_logp.dtype)
    diff = token_logp if reference_logp is None else token_logp - reference_logp.to(token_logp.dtype)
    total = (diff * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1.0) if average else total


def pair_loss_and_slope(margin: Tensor, *, loss: str, beta: float, gamma: float = 0.0) -> tuple[Tensor, Tensor]:
    """(f(margin) [N], g = -f'(margin) [N]) of the preference loss."""
    if loss == "dpo":
        return -F.logsigmoid(beta * margin), beta * torch.sigmoid(-beta * margin)
    if loss == "ipo":
        gap = margin - 1.0 / (2.0 * beta)
        return gap.square(), -2.0 * gap
    if loss == "simpo":
        z = beta * margin - gamma
        return -F.logsigmoid(z), beta * torch.sigmoid(-z)
    raise ValueError(f"preference loss must be one of {sorted(AVERAGED)}, got {loss!r}")


@torch.no_grad()
def preference_terms(
    token_logp: Tensor,
    mask: Tensor,
    preference: Tensor,
    group_size: int,
    reference_logp: Tensor | None,
    *,
    loss: str,
    beta: float,
    gamma: float = 0.0,
) -> PreferenceTerms:
    """The per-token weight and loss of every pair, from the policy's token log-probs
    ``token_logp`` [B, R] (and the reference's, [B, R], except for SimPO)."""
    if loss not in AVERAGED:
        raise ValueError(f"preference loss must be one of {sorted(AVERAGED)}, got {loss!r}")
    if loss != "simpo" and reference_logp is None:
        raise ValueError(f"the {loss} loss needs the reference's log-probs (reference_logp)")
    if token_logp.dtype in (torch.float16, torch.bfloat16):
        token_logp = token_logp.float()  # sums over a sequence need at least float32
    mask_f = mask.to(token_logp.dtype)
    average = AVERAGED[loss]
    scores = sequence_scores(token_logp, mask, None if loss == "simpo" else reference_logp, average=average)  # [B]
    chosen, rejected = pair_rows(preference, group_size)
    margin = scores[chosen] - scores[rejected]  # [N]
    pair_loss, slope = pair_loss_and_slope(margin, loss=loss, beta=beta, gamma=gamma)
    lengths = mask_f.sum(-1).clamp_min(1.0)  # [B]
    # d score / d log pi(y_t): 1 for a sum, 1 / length for a mean
    per_token = 1.0 / lengths if average else torch.ones_like(lengths)
    row_weight = torch.zeros_like(scores)
    row_weight[chosen] = slope * per_token[chosen]
    row_weight[rejected] = -slope * per_token[rejected]
    row_loss = torch.zeros_like(scores)
    pair_tokens = lengths[chosen] + lengths[rejected]
    row_loss[chosen] = pair_loss / pair_tokens
    row_loss[rejected] = pair_loss / pair_tokens
    return PreferenceTerms(
        weight=row_weight[:, None] * mask_f,
        loss=row_loss[:, None] * mask_f,
        pair_loss=pair_loss,
        margin=margin,
        chosen_score=scores[chosen],
        rejected_score=scores[rejected],
    )


def pairs_from_rewards(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """[B] preference marks from each group's rewards: +1 on its best sample, -1 on its
    worst (the first of any tie), 0 elsewhere; a group whose rewards are all equal is
    unusable and gets only zeros. ``valid`` [B] bool: the samples that may be paired (a
    failed one never is)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}; preference pairs "
                         f"from rewards need data_source.sampling.num_generations >= 2")
    groups = rewards.reshape(-1, group_size)
    ok = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.reshape(groups.shape).bool()
    marks = torch.zeros_like(groups)
    big = torch.finfo(groups.dtype).max
    highest, lowest = groups.masked_fill(~ok, -big), groups.masked_fill(~ok, big)
    best, worst = highest.argmax(-1), lowest.argmin(-1)
    usable = highest.max(-1).values > lowest.min(-1).values
    rows = torch.arange(groups.shape[0], device=rewards.device)[usable]
    marks[rows, best[usable]] = 1.0
    marks[rows, worst[usable]] = -1.0
    return marks.reshape(-1)
