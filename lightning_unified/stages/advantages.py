"""The advantages stage: each row's reward, less the k1 KL penalty when configured, through
the signal's advantage estimator (group-normalised, leave-one-out, ...) onto every token in
the loss. Data rewarded as it is (reward-weighted SFT) keeps its reward as the weight."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from lightning_unified import batch as fields
from lightning_unified.losses import advantages as estimators
from lightning_unified.registry import ADVANTAGES
from lightning_unified.specs import Reference, Sparse
from lightning_unified.stages.base import Stage


def estimate_advantages(rewards: Tensor, estimator: str, group_size: int, eps: float = 1e-6) -> Tensor:
    """[B] rewards to [B] advantages through the registered ``estimator``
    (:data:`lightning_unified.registry.ADVANTAGES`). Groups are consecutive rows sharing a
    prompt; ``eps`` keeps a standard deviation's division finite."""
    entry = ADVANTAGES[estimator]
    if entry.grouped and group_size < 2:
        raise ValueError(
            f"signal.advantage={estimator!r} compares responses to the same prompt, but the batch has "
            f"{group_size} per prompt; set data_source.sampling.num_generations >= 2 or use 'reinforce'"
        )
    return entry.fn(rewards, group_size=group_size, eps=eps)


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
        if fields.EPISODE in batch:
            # G episodes per prompt, each on one or more rows (a template that rewrote history):
            # the estimator compares episodes, and each row takes its episode's advantage
            episode = torch.as_tensor(batch[fields.EPISODE], device=rewards.device)
            first = estimators.first_rows(batch[fields.EPISODE], rewards.device)
            advantages = estimate_advantages(rewards[first], self.signal.advantage, batch.get(fields.GROUP_SIZE, 1),
                                             self.signal.std_eps)[episode]
        else:
            advantages = estimate_advantages(rewards, self.signal.advantage, batch.get(fields.GROUP_SIZE, 1),
                                             self.signal.std_eps)
        batch[fields.ADVANTAGES] = estimators.to_tokens(advantages, fields.loss_mask(batch))
