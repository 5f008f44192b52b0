"""Importance ratios rho = pi_theta / mu between the policy and the behaviour policy.

Off-policy and on-policy data differ only by this ratio: with samples from the current
policy rho == 1 and every weight reduces to its on-policy form. Ratios are formed in log
space (a difference of log-probs, then one exp) because a product of per-token
probabilities underflows long before a sequence ends.

All functions are pure; shapes are [B, T] with a {0, 1} ``mask`` unless stated otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


# rho = exp(log rho) is formed from log rho capped here: e^20 is about 5e8, far past any clip
# or truncation, and a float32 exp overflows to inf (and inf * 0 to NaN) past about 88
MAX_LOG_RATIO = 20.0


def ratio_from_log(log_ratio: Tensor) -> Tensor:
    """rho = exp(log rho), never infinite: log rho is capped at MAX_LOG_RATIO first."""
    return log_ratio.clamp_max(MAX_LOG_RATIO).exp()


def token_log_ratio(logp: Tensor, behaviour_logp: Tensor) -> Tensor:
    """log rho_t = log pi_theta(y_t) - log mu(y_t), any shape."""
    return logp - behaviour_logp


def sequence_log_ratio(logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence ratio, as a log, broadcast to every token of its sequence: [B, T].

    ``log s_i = mean_t (log pi_theta - log mu)`` over the sequence's tokens: the geometric
    mean keeps the ratio of a long sequence on the same scale as a short one. With the
    ``seq_mean_token_mean`` aggregation, giving every token the weight ``s_i A_i`` is exactly
    the gradient of the sequence-level surrogate.
    """
    mask = mask.to(logp.dtype)
    lengths = mask.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    per_sequence = ((logp - behaviour_logp) * mask).sum(-1, keepdim=True) / lengths  # [B, 1]
    return per_sequence.expand_as(logp) * mask


def truncated_ratio(rho: Tensor, truncate: float) -> Tensor:
    """min(rho, c): truncated importance sampling (TIS). Bounds the variance a stale or
    mismatched sampler (e.g. an inference engine) brings, at the price of some bias."""
    if truncate <= 0:
        raise ValueError(f"truncate must be > 0, got {truncate}")
    return rho.clamp_max(truncate)


def ppo_clip_active(rho: Tensor, advantages: Tensor, *, eps_low: float, eps_high: float) -> Tensor:
    """Where PPO's clipped surrogate still passes a gradient, bool.

    ``min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` picks the clipped constant, and
    so stops the gradient, when the ratio has already moved past the trust region in the
    direction the advantage pushes: rho > 1 + eps_high with A > 0, or rho < 1 - eps_low
    with A < 0.
    """
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    too_high = (advantages > 0) & (rho > 1.0 + eps_high)
    too_low = (advantages < 0) & (rho < 1.0 - eps_low)
    return ~(too_high | too_low)


@torch.no_grad()
def mismatch_kl(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(sampler || trainer) on the sampled tokens, by the k3 estimator
    ``r - 1 - log r`` with ``r = pi_trainer(y_t) / mu(y_t)`` (unbiased, never negative):
    0 when the engine reports exactly the trainer's probabilities. Scalar."""
    valid = mask.bool()
    log_r = (trainer_logp[valid] - sampler_logp[valid]).float().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if log_r.numel() == 0:
        return log_r.new_zeros(())
    # expm1: r - 1 without the cancellation that makes exp(x) - 1 - x negative in float32
    # for |x| below about 3e-4 (an engine that agrees with the trainer)
    return (torch.expm1(log_r) - log_r).mean()


@torch.no_grad()
def ratio_diagnostics(
    log_ratio: Tensor,
    mask: Tensor,
    *,
    advantages: Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    truncate: float | None = None,
) -> dict[str, Tensor]:
    """What a run needs to see about its ratios, as detached scalars.

    - ``ess``: effective sample size ``(sum rho)^2 / (n sum rho^2)`` in (0, 1]; 1 when the
      data is on-policy, small when a few tokens carry all the weight.
    - ``mean_ratio``, ``max_ratio``.
    - ``clip_fraction``: share of tokens whose gradient PPO's clip stops (with advantages
      and eps); ``truncated_fraction``: share above ``truncate``.
    """
    valid = mask.bool()
    rho = ratio_from_log(log_ratio[valid].float())
    if rho.numel() == 0:
        return {}
    out = {
        "ess": rho.sum().square() / (rho.numel() * rho.square().sum()),
        "mean_ratio": rho.mean(),
        "max_ratio": rho.max(),
    }
    if advantages is not None and eps_low is not None and eps_high is not None:
        active = ppo_clip_active(rho, advantages[valid].float(), eps_low=eps_low, eps_high=eps_high)
        out["clip_fraction"] = (~active).float().mean()
    if truncate is not None:
        out["truncated_fraction"] = (rho > truncate).float().mean()
    return out
