"""A reward model's objective on preference pairs: Bradley-Terry on a scalar head.

The reward model is not a policy: its output is one number per sequence, and nothing is
sampled from it, so its loss is no weight on ``grad log pi``. It is a second objective
beside the one equation (as the critic's value loss is, :mod:`lightning_unified.losses.value`),
differentiated by autograd through the scalar head. The definitions are TRL's
``RewardTrainer``'s, term for term.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | None = None,
                       center_coefficient: float | None = None) -> Tensor:
    """[P] each pair's loss, ``-log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2``.

    ``chosen`` and ``rejected`` [P]: the reward model's scores of each pair's two responses;
    ``margin`` [P]: how far apart the pair must be before it stops pulling (the data's
    ``margin`` column; None: 0); ``center_coefficient`` c (TRL's
    ``center_rewards_coefficient``, Eisenstein et al. 2023, eq. 2; 0.01 is their advice;
    None: off) pulls the scores towards mean zero, which Bradley-Terry alone leaves free
    (adding a constant to every score changes no probability). The mean over pairs is the
    run's normaliser (``pair_mean``), not this function's.

    Its gradient, with s = sigmoid(-(r_c - r_r - m)): d/dr_c = -s + 2c(r_c + r_r) and
    d/dr_r = s + 2c(r_c + r_r).
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be [P] alike, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if margin is not None and margin.shape != chosen.shape:
        raise ValueError(f"margin must be [P] like the scores, got {tuple(margin.shape)}")
    difference = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen.dtype)
    loss = -F.logsigmoid(difference)  # [P], stable for any difference
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected).square()
    return loss


def pair_statistics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Detached [P] per-pair numbers the logs average: ``accuracy`` (1 where the chosen
    response scores above the rejected one; a tie counts 0, as TRL's strict comparison) and
    ``margin`` (r_c - r_r)."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"accuracy": (chosen > rejected).float(), "margin": chosen - rejected}
