"""Objectives beside the one equation: losses on a head of the model's own, differentiated
by autograd, that push no token's log-prob.

The one equation (:mod:`lightning_unified.losses.objective`) trains the policy: every method
is a weight on ``grad log pi``. Classic RLHF also trains regressions on a scalar head: the
reward model's Bradley-Terry loss on pairs (:class:`RewardPairsObjective`), and next the
critic's value loss. Their gradients are not of that form (a score is not a log-prob), so
they are objectives of their own, each a small ``nn.Module`` holding its head, that the step
asks for its loss terms (:func:`lightning_unified.step.update_loss`), the module for its
validation and its save; the normaliser, the accumulation, the logs of the step and the
checkpoint stay the module's. A signal that brings one names it here; the rest of the step
never looks at which.
"""

from __future__ import annotations

from torch import nn

from lightning_unified.objectives.reward_pairs import RewardPairsObjective, ObjectiveTerms
from lightning_unified.specs import RewardPairs


def objective_for(signal, policy: nn.Module) -> nn.Module | None:
    """The objective ``signal`` trains beside (or, for a reward model, instead of) the one
    equation on ``policy``'s decoder; None: the one equation alone."""
    if isinstance(signal, RewardPairs):
        return RewardPairsObjective(signal, policy)
    return None


__all__ = ["ObjectiveTerms", "RewardPairsObjective", "objective_for"]
