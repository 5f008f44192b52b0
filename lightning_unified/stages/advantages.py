"""The advantages stage: each row's reward, less the k1 KL penalty when configured, through
the signal's advantage estimator (group-normalised, leave-one-out, ...) onto every token in
the loss. Data rewarded as it is (reward-weighted SFT) keeps its reward as the weight."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from lightning_unified import batch as fields
from lightning_unified.losses import advantages as estimators
from lightning_unified.losses.aggregation import all_reduce_sum
from lightning_unified.specs import Reference, Sparse
from lightning_unified.stages.base import Stage


def estimate_advantages(rewards: Tensor, estimator: str, group_size: int, eps: float = 1e-6) -> Tensor:
    """[B] rewards to [B] advantages. Groups are consecutive rows sharing a prompt; ``eps``
    keeps a standard deviation's division finite."""
    if estimator == "reinforce":
        # the mean over the whole global batch, not this rank's share of it
        total = all_reduce_sum(torch.stack([rewards.sum().double(), rewards.new_tensor(rewards.numel()).double()]))
        return estimators.reinforce_advantages(rewards, baseline=(total[0] / total[1]).to(rewards.dtype))
    if group_size < 2:
        raise ValueError(
            f"signal.advantage={estimator!r} compares responses to the same prompt, but the batch has "
            f"{group_size} per prompt; set data_source.sampling.num_generations >= 2 or use 'reinforce'"
        )
    if estimator == "grpo":
        return estimators.grpo_advantages(rewards, group_size=group_size, eps=eps)
    if estimator == "grpo_batch_std":
        # the standard deviation of the whole global batch's rewards, not this rank's share
        r = rewards.double()
        n, total, squares = all_reduce_sum(torch.stack([r.new_tensor(r.numel()), r.sum(), r.square().sum()]))
        std = ((squares - total * total / n).clamp_min(0.0) / (n - 1).clamp_min(1.0)).sqrt()
        return estimators.grpo_batch_std_advantages(rewards, group_size=group_size, batch_std=std.to(rewards.dtype),
                                                    eps=eps)
    fn = {"rloo": estimators.rloo_advantages, "dr_grpo": estimators.dr_grpo_advantages}[estimator]
    return fn(rewards, group_size=group_size)


class AdvantagesStage(Stage):
    """Sampled rows' rewards become advantages (``signal.advantage``); with a k1 reference
    they first lose ``kl_coef * sum_t (log pi - log pi_ref)``. The data's rewards
    (``signal.reward_data``) are the weight themselves, with no baseline, so data tokens
    are never pushed down. A batch without rewards (a mixed source's data batch under RL)
    is left as it is: every data token has weight 1."""

    name = "advantages"

    def __init__(self, signal: Sparse, reference: Reference | None = None):
        super().__init__()
        self.signal = signal
        self.k1 = reference if reference is not None and reference.estimator == "k1" else None

    def reads(self) -> set[str]:
        return {fields.RESPONSE_MASK} | ({fields.REFERENCE_LOGP} if self.k1 is not None else set())

    def writes(self) -> set[str]:
        return {fields.ADVANTAGES}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if fields.REWARDS not in batch:
            return
        rewards = batch[fields.REWARDS]
        if not fields.is_sampled(batch):
            batch[fields.ADVANTAGES] = estimators.to_tokens(rewards, fields.loss_mask(batch))
            return
        if self.k1 is not None:
            fields.require(batch, fields.REFERENCE_LOGP, who="the k1 reference penalty")
            rewards = estimators.kl_penalized_rewards(rewards, batch[fields.BEHAVIOUR_LOGP], batch[fields.REFERENCE_LOGP],
                                                      fields.loss_mask(batch), kl_coef=self.k1.kl_coef)
        advantages = estimate_advantages(rewards, self.signal.advantage, batch.get(fields.GROUP_SIZE, 1),
                                         self.signal.std_eps)
        batch[fields.ADVANTAGES] = estimators.to_tokens(advantages, fields.loss_mask(batch))
