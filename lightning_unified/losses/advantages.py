"""Rewards -> advantages: the scalar that sparse on-policy weights multiply.

Responses come in groups of ``group_size`` consecutive rows, one group per prompt, as the
sampler lays them out. All functions are pure; ``rewards`` is [B] unless stated otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B] -> [B / G, G], with a clear error when B is not a multiple of G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def _centred(groups: Tensor) -> Tensor:
    """r - mean per group, [P, G]; exactly 0 for a group whose rewards are all equal (a
    rounded mean would leave ~1e-8, which GRPO's std division would blow up)."""
    centred = groups - groups.mean(-1, keepdim=True)
    same = (groups == groups[:, :1]).all(-1, keepdim=True)
    return centred.masked_fill(same, 0.0)


def reinforce_advantages(rewards: Tensor, baseline: Tensor | float | None = None) -> Tensor:
    """REINFORCE with a baseline: A_i = r_i - b, by default the batch mean. Across ranks,
    pass the global batch's mean, so every process layout gives the same advantages."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    return rewards - (rewards.mean() if baseline is None else baseline)


def rloo_advantages(rewards: Tensor, *, group_size: int) -> Tensor:
    """RLOO: A_i = r_i - mean of the other G - 1 rewards of the same prompt.

    The baseline excludes the sample itself, so it stays unbiased with small groups.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)  # [P, G]
    # r_i - mean of the others = G / (G - 1) * (r_i - mean of all)
    return (_centred(groups) * (group_size / (group_size - 1))).reshape(-1)


def grpo_advantages(rewards: Tensor, *, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), per prompt group (unbiased std, as in GRPO).

    A group whose rewards are all equal gets zero advantage: it carries no signal.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    return (_centred(groups) / (groups.std(-1, keepdim=True) + eps)).reshape(-1)


def grpo_batch_std_advantages(rewards: Tensor, *, group_size: int, batch_std: Tensor | float | None = None,
                              eps: float = 1e-6) -> Tensor:
    """Group mean, batch standard deviation: A_i = (r_i - mean_g) / (std_batch + eps), where
    std_batch is the unbiased std of every reward of the batch (TRL's ``scale_rewards="batch"``).
    A prompt answered equally well everywhere still gets zero advantage, while the step's
    scale no longer depends on how spread each group happens to be. Across ranks, pass the
    global batch's std."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    std = rewards.std() if batch_std is None else batch_std
    return (_centred(groups) / (std + eps)).reshape(-1)


def dr_grpo_advantages(rewards: Tensor, *, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g, no std division (which up-weights too-easy and
    too-hard prompts). Pair it with the ``constant`` loss aggregation."""
    return _centred(_groups(rewards, group_size)).reshape(-1)


def first_rows(episode: list[int], device=None) -> Tensor:
    """[E] the first row of each episode, episodes numbered 0..E-1 on consecutive rows
    (``episode`` [B], a host list: no device read)."""
    return torch.tensor([i for i, e in enumerate(episode) if i == 0 or episode[i - 1] != e], device=device)


def to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence advantages [B] onto every response token [B, T] (0 on padding)."""
    return advantages.unsqueeze(-1) * mask.to(advantages.dtype)


def kl_penalized_rewards(
    rewards: Tensor, logp: Tensor, reference_logp: Tensor, mask: Tensor, *, kl_coef: float
) -> Tensor:
    """The k1 reference penalty in the reward: r_i - kl_coef * sum_t (l_theta - l_ref). [B].

    ``logp`` and ``reference_logp`` [B, T] are the sampled tokens' log-probs (detached).
    Summed over the sequence, k1 is an unbiased estimate of the sequence's KL to the
    reference. (The k3 estimator as a loss term is
    :func:`lightning_unified.losses.weight_builders.k3_reference_penalty`.)
    """
    k1 = ((logp - reference_logp) * mask).sum(-1)
    return rewards - kl_coef * k1


def reverse_kl_returns(teacher_logp: Tensor, student_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages for on-policy distillation with the teacher as reward. [B, T].

    The per-token reward is r_t = l_T(y_t) - l_theta(y_t); the advantage of token t is the
    sum of rewards from t to the end of its sequence, because choosing y_t also changes
    which later tokens get sampled. With ``advantage_indicator`` weights, its expectation is
    the exact gradient of the sequence-level KL(student || teacher).
    """
    rewards = (teacher_logp - student_logp) * mask
    # reverse cumulative sum: returns_t = sum_{s >= t} r_s
    return rewards.flip(-1).cumsum(-1).flip(-1) * mask


def reward_metrics(rewards: Tensor, *, group_size: int | None = None) -> dict[str, Tensor]:
    """The real objective of a sparse on-policy run, as detached scalars: mean and std of the
    reward and, per prompt group, the share of groups whose rewards all agree (they give
    GRPO no gradient; DAPO resamples them)."""
    rewards = rewards.detach().float()
    out = {"reward_mean": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())}
    if group_size is not None:
        groups = _groups(rewards, group_size)
        out["zero_signal_fraction"] = (groups == groups[:, :1]).all(-1).float().mean()
    return out
