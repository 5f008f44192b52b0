"""TRL's losses, written from the formulas its documentation and each method's paper give
(not from its code), on a plain Hugging Face forward: the other side of every row of
docs/coming_from_trl.md. Each function returns a scalar loss whose autograd gradient TRL's
trainer would step on, for one process and one micro-batch.

Shapes: B rows, P prompt tokens, R response tokens, V the vocabulary; ``mask`` [B, R] is 1
on completion tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def completion_logits(model, prompt_ids: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """[B, R, V] the logits that predict each completion token (prompt and completion are
    one sequence; position t predicts token t + 1), from one full forward."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), response_mask], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits
    return logits[:, prompt_ids.shape[1] - 1: -1]


def token_logp(logits: Tensor, response_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """[B, R] log pi(y_t) at ``temperature``."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, response_ids[..., None])[..., 0]


# --- SFTTrainer ----------------------------------------------------------------------
def sft_loss(logits: Tensor, response_ids: Tensor, mask: Tensor, loss_type: str = "nll") -> Tensor:
    """``nll``: the mean over completion tokens of -log p(y_t). ``dft`` (Dynamic Fine-Tuning,
    arXiv 2508.05629): each token's -log p scaled by its probability, detached."""
    logp = token_logp(logits, response_ids)
    per_token = -logp if loss_type == "nll" else -logp.exp().detach() * logp
    return (per_token * mask).sum() / mask.sum()


# --- GKDTrainer (arXiv 2306.13649) ---------------------------------------------------
def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, beta: float,
                         temperature: float) -> Tensor:
    """The generalised JSD of GKD per completion token, averaged over them: beta = 0 is
    KL(teacher || student), beta = 1 is KL(student || teacher), and in between
    beta KL(teacher || m) + (1 - beta) KL(student || m) with m = beta teacher + (1 - beta) student."""
    s = torch.log_softmax(student_logits / temperature, -1)
    t = torch.log_softmax(teacher_logits / temperature, -1)

    def kl(p, q):  # KL(p || q) from log-probs, per position
        return (p.exp() * (p - q)).sum(-1)

    if beta == 0:
        jsd = kl(t, s)
    elif beta == 1:
        jsd = kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
        jsd = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return (jsd * mask).sum() / mask.sum()


# --- GRPOTrainer (arXiv 2402.03300, DAPO 2503.14476, Dr. GRPO 2503.20783, GSPO 2507.18071) ----
def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """[B] (r - the group's mean) / (std + 1e-4): the group's std, the whole batch's, or none."""
    groups = rewards.reshape(-1, num_generations)
    centred = (groups - groups.mean(-1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    std = groups.std(-1).repeat_interleave(num_generations) if scale_rewards == "group" else rewards.std()
    return centred / (std + 1e-4)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str,
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: Tensor | None = None, importance_sampling_level: str = "token",
              max_completion_length: int | None = None) -> Tensor:
    """The clipped surrogate per token, -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),
    plus beta times the k3 estimate of KL(pi || pi_ref), aggregated by ``loss_type``:
    grpo (each sequence's token mean, then the mean over sequences), bnpo and dapo (the mean
    over every completion token of the batch), dr_grpo (the sum over tokens divided by
    B x max_completion_length). GSPO's sequence level uses each sequence's mean log-ratio."""
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp_min(1.0))[:, None]
    ratio = log_ratio.exp()
    eps_high = epsilon if epsilon_high is None else epsilon_high
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + eps_high) * a)
    if beta:
        delta = ref_logp - logp
        per_token = per_token + beta * (delta.exp() - delta - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (logp.shape[0] * max_completion_length)
    raise ValueError(loss_type)


# --- DPOTrainer / CPOTrainer (DPO 2305.18290, IPO 2310.12036, SimPO 2405.14734) ------------
def preference_loss(logp: Tensor, mask: Tensor, chosen: Tensor, rejected: Tensor, *, loss_type: str,
                    beta: float, ref_logp: Tensor | None = None, gamma: float = 0.0) -> Tensor:
    """The mean over pairs of: sigmoid (DPO) -log sigmoid(beta (log-ratio margin)), with
    summed log-probs; ipo (margin - 1 / (2 beta))^2 with length-averaged log-probs; simpo
    (CPOTrainer, cpo_alpha=0) -log sigmoid(beta (mean logp_c - mean logp_r) - gamma), no
    reference."""
    mask = mask.to(logp.dtype)
    score = logp if ref_logp is None or loss_type == "simpo" else logp - ref_logp
    total = (score * mask).sum(-1)
    if loss_type in ("ipo", "simpo"):
        total = total / mask.sum(-1)
    margin = total[chosen] - total[rejected]
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin).mean()
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)).square().mean()
    if loss_type == "simpo":
        return -F.logsigmoid(beta * margin - gamma).mean()
    raise ValueError(loss_type)
