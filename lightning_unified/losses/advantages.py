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


def _valid(valid: Tensor | None, groups: Tensor) -> Tensor:
    """[P, G] bool: the rows that count, ``valid`` [B] laid out as ``groups`` (every row when None)."""
    if valid is None:
        return torch.ones_like(groups, dtype=torch.bool)
    if valid.shape != (groups.numel(),):
        raise ValueError(f"valid must be [B] like the rewards ({groups.numel()}), got shape {tuple(valid.shape)}")
    return valid.reshape(groups.shape).bool()


def _centred(groups: Tensor, valid: Tensor) -> Tensor:
    """r - mean of each group's valid rows, [P, G], 0 on the others; exactly 0 for a group
    whose valid rewards are all equal (a rounded mean would leave ~1e-8, which GRPO's std
    division would blow up), and so for a group of one valid row."""
    kept = groups.masked_fill(~valid, 0.0)
    n = valid.sum(-1, keepdim=True).to(groups.dtype)
    centred = (kept - kept.sum(-1, keepdim=True) / n.clamp_min(1.0)).masked_fill(~valid, 0.0)
    big = torch.finfo(groups.dtype).max
    highest = groups.masked_fill(~valid, -big).amax(-1, keepdim=True)
    same = highest <= groups.masked_fill(~valid, big).amin(-1, keepdim=True)
    return centred.masked_fill(same, 0.0)


def _std(centred: Tensor, valid: Tensor) -> Tensor:
    """The unbiased standard deviation of each group's valid rows, [P, 1] (0 with one row),
    from their centred rewards."""
    n = valid.sum(-1, keepdim=True).to(centred.dtype)
    return (centred.square().sum(-1, keepdim=True) / (n - 1.0).clamp_min(1.0)).sqrt()


def masked_std(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """The unbiased standard deviation of ``values`` [B] where ``valid`` [B] (all, when None); 0 with one."""
    groups = values.reshape(1, -1)
    ok = _valid(valid, groups)
    return _std(_centred(groups, ok), ok).reshape(())


def reinforce_advantages(rewards: Tensor, baseline: Tensor | float | None = None,
                         valid: Tensor | None = None) -> Tensor:
    """REINFORCE with a baseline: A_i = r_i - b, by default the mean of the valid rows
    (``valid`` [B] bool; a failed row's advantage is 0). Across ranks, pass the global
    batch's mean, so every process layout gives the same advantages."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    ok = _valid(valid, rewards.reshape(1, -1)).reshape(-1)
    if baseline is None:
        baseline = rewards.masked_fill(~ok, 0.0).sum() / ok.sum().clamp_min(1)
    return (rewards - baseline).masked_fill(~ok, 0.0)


def rloo_advantages(rewards: Tensor, *, group_size: int, valid: Tensor | None = None) -> Tensor:
    """RLOO: A_i = r_i - mean of the other valid rewards of the same prompt.

    The baseline excludes the sample itself, so it stays unbiased with small groups.
    ``valid`` [B] bool: rows that count; a failed row enters no baseline and gets 0, so a
    group with a failed row gets the advantages of the group without it.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)  # [P, G]
    ok = _valid(valid, groups)
    n = ok.sum(-1, keepdim=True).to(groups.dtype)
    # r_i - mean of the n - 1 others = n / (n - 1) * (r_i - mean of all n); 0 for a lone row
    return (_centred(groups, ok) * (n / (n - 1.0).clamp_min(1.0))).reshape(-1)


def grpo_advantages(rewards: Tensor, *, group_size: int, eps: float = 1e-6, valid: Tensor | None = None) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), per prompt group (unbiased std, as in GRPO),
    over each group's valid rows (``valid`` [B] bool; a failed row gets 0).

    A group whose rewards are all equal gets zero advantage: it carries no signal.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    ok = _valid(valid, groups)
    centred = _centred(groups, ok)
    return (centred / (_std(centred, ok) + eps)).reshape(-1)


def grpo_batch_std_advantages(rewards: Tensor, *, group_size: int, batch_std: Tensor | float | None = None,
                              eps: float = 1e-6, valid: Tensor | None = None) -> Tensor:
    """Group mean, batch standard deviation: A_i = (r_i - mean_g) / (std_batch + eps), where
    std_batch is the unbiased std of every valid reward of the batch (TRL's ``scale_rewards="batch"``).
    A prompt answered equally well everywhere still gets zero advantage, while the step's
    scale no longer depends on how spread each group happens to be. Across ranks, pass the
    global batch's std."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    std = masked_std(rewards, valid) if batch_std is None else batch_std
    return (_centred(groups, _valid(valid, groups)) / (std + eps)).reshape(-1)


def dr_grpo_advantages(rewards: Tensor, *, group_size: int, valid: Tensor | None = None) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g over the group's valid rows, no std division (which
    up-weights too-easy and too-hard prompts). Pair it with the ``constant`` loss aggregation."""
    groups = _groups(rewards, group_size)
    return _centred(groups, _valid(valid, groups)).reshape(-1)


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


def reward_metrics(rewards: Tensor, *, group_size: int | None = None, valid: Tensor | None = None) -> dict[str, Tensor]:
    """The real objective of a sparse on-policy run, as detached scalars: mean and std of the
    reward of the valid rows (``valid`` [B] bool; all when None) and, per prompt group, the
    share of groups whose valid rewards all agree (they give GRPO no gradient; DAPO resamples them)."""
    rewards = rewards.detach().float()
    flat = rewards.reshape(1, -1)
    ok = _valid(valid, flat)
    mean = flat.masked_fill(~ok, 0.0).sum() / ok.sum().clamp_min(1)
    out = {"reward_mean": mean, "reward_std": _std(_centred(flat, ok), ok).reshape(())}
    if group_size is not None:
        groups = _groups(rewards, group_size)
        zero = _centred(groups, _valid(valid, groups)) == 0
        out["zero_signal_fraction"] = zero.all(-1).float().mean()
    return out


# --- per-token advantages from a learned critic (GAE) ---------------------------------------


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float,
                   episode_ends: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(advantages [B, T], returns [B, T]) by generalised advantage estimation (Schulman et
    al. 2016), both 0 outside ``mask``.

    ``rewards`` [B, T]: each token's reward (the reward model's score on a response's last
    token, a per-token KL penalty, a turn's reward on its last token); ``values`` [B, T]: the
    critic's V(s_t) at each token; ``mask`` [B, T]: the tokens the policy chose (response
    tokens; not padding, not an environment's observation tokens). Masked-out tokens are
    skipped, not zeros in the chain: the token after a chosen token is the next chosen one,
    so an observation spliced between two turns neither bootstraps nor cuts the recursion;
    their rewards are not read. ``episode_ends`` [B, T] bool: True on the last token of an
    episode (a row may hold several laid end to end, and a row's last token always ends
    one): nothing flows back across it, its next value is 0.

    For the chosen tokens t_1 < t_2 < ... of a row, with V' = V(t_{i+1}) (0 after an
    episode's end), delta_i = r_i + gamma * V' - V_i and A_i = sum_l (gamma * lam)^l
    delta_{i+l} within the episode, computed as the reverse recursion A_i = delta_i +
    gamma * lam * A_{i+1}; the critic's target is A_i + V_i. One pass over T, [B] at a
    time, as verl's ``compute_gae_advantage_return`` (the loop is over tokens, the rows are
    a vector)."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards, values and mask must be [B, T] alike, got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    if episode_ends is not None and episode_ends.shape != rewards.shape:
        raise ValueError(f"episode_ends must be [B, T] like the rewards, got {tuple(episode_ends.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)  # the recursion sums T terms
    rewards, values, chosen = rewards.to(dtype), values.detach().to(dtype), mask.bool()
    ends = torch.zeros_like(chosen) if episode_ends is None else episode_ends.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # [B] V of the next chosen token (0 past the row)
    next_advantage = torch.zeros_like(next_value)  # [B] A of the next chosen token
    for t in reversed(range(rewards.shape[1])):
        # an episode that ends at t: nothing of the next one flows back into it
        next_value = next_value.masked_fill(ends[:, t], 0.0)
        next_advantage = next_advantage.masked_fill(ends[:, t], 0.0)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        here = delta + gamma * lam * next_advantage
        keep = chosen[:, t]
        advantages[:, t] = here.masked_fill(~keep, 0.0)
        # a token the policy did not choose is skipped: the carry passes over it unchanged
        next_value = torch.where(keep, values[:, t], next_value)
        next_advantage = torch.where(keep, here, next_advantage)
    returns = (advantages + values).masked_fill(~chosen, 0.0)
    return advantages, returns


def masked_moments(values: Tensor, mask: Tensor) -> Tensor:
    """[3] float64 (count, sum, sum of squares) of ``values`` [B, T] where ``mask``: what a
    stage sums over ranks before :func:`whiten`, so every rank whitens with the global batch's
    statistics (as the group baselines do)."""
    kept = values.detach().double().masked_fill(~mask.bool(), 0.0)
    return torch.stack([mask.bool().sum().double(), kept.sum(), kept.square().sum()])


def whiten(values: Tensor, mask: Tensor, moments: Tensor | None = None, *, shift_mean: bool = True,
           eps: float = 1e-8) -> Tensor:
    """``values`` [B, T] scaled to unit variance over the ``mask``ed tokens (and centred with
    ``shift_mean``), 0 elsewhere: PPO's advantage whitening. ``moments``: (count, sum, sum of
    squares) from :func:`masked_moments`, summed over ranks; None takes this batch's own. The
    variance is the unbiased one (verl's and TRL's ``masked_whiten``); with one token it is 0
    and only ``eps`` divides."""
    moments = masked_moments(values, mask) if moments is None else moments.double()
    count, total, squares = moments.unbind()
    mean = total / count.clamp_min(1.0)
    variance = ((squares - total * mean) / (count - 1.0).clamp_min(1.0)).clamp_min(0.0)
    mean, scale = mean.to(values.dtype), (variance + eps).rsqrt().to(values.dtype)
    out = (values - mean) * scale
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask.bool(), 0.0)
