"""The critic's objective: a clipped squared error between its values and the GAE returns.

This is not a weight on ``grad log pi``: the critic is a regression, a second small objective
beside the one equation (as the reward model's Bradley-Terry loss is,
:mod:`lightning_unified.losses.bradley_terry`), and its gradient flows through autograd on
a scalar head, never through the policy's chunked vocabulary loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, clip: float | None
                       ) -> tuple[Tensor, Tensor]:
    """(per-token loss [B, T], clipped [B, T] bool) of PPO's value function.

    ``values`` [B, T]: the critic now (with a gradient); ``old_values`` [B, T]: the critic's
    values when the rollout's advantages were computed; ``returns`` [B, T]: their targets.
    The loss is ``0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)`` (the 0.5 of
    verl's ``compute_value_loss`` and TRL's PPO): the critic moves at most ``c`` from where it
    was before the error stops pulling it, unless moving further also lowers the error.
    ``clip`` None: the plain ``0.5 * (v - R)^2``. ``clipped``: the tokens where the clipped
    error is the larger one (verl's ``vf_clipfrac``), whose gradient is 0 when v is outside
    the band. The caller masks and normalises (the run's aggregation)."""
    if values.shape != old_values.shape or values.shape != returns.shape:
        raise ValueError(f"values, old_values and returns must have one shape, got {tuple(values.shape)}, "
                         f"{tuple(old_values.shape)} and {tuple(returns.shape)}")
    returns = returns.detach()
    unclipped = (values - returns).square()  # [B, T]
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    if clip <= 0:
        raise ValueError(f"the value clip must be > 0 (or None: no clip), got {clip}")
    old = old_values.detach()
    moved = old + (values - old).clamp(-clip, clip)  # [B, T] clip(v, v_old - c, v_old + c)
    clipped_error = (moved - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped_error), clipped_error > unclipped
