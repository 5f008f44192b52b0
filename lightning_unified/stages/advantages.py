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


def estimate_advantages(rewards: Tensor, estimator: str, group_size: int, eps: float = 1e-6,
                        valid: Tensor | None = None) -> Tensor:
    """[B] rewards to [B] advantages through the registered ``estimator``
    (:data:`lightning_unified.registry.ADVANTAGES`). Groups are consecutive rows sharing a
    prompt; ``eps`` keeps a standard deviation's division finite. ``valid`` [B] bool: the
    rows that did not fail. A failed row's advantage is 0 and it enters no statistic; an
    estimator registered without a ``valid`` argument cannot leave a row out, so it is
    given only the whole groups (the rows, when it is not grouped) without a failed row,
    and the others get 0 (:func:`kept_rows`; the stage leaves them out of the loss)."""
    entry = ADVANTAGES[estimator]
    if entry.grouped and group_size < 2:
        raise ValueError(
            f"signal.advantage={estimator!r} compares responses to the same prompt, but the batch has "
            f"{group_size} per prompt; set data_source.sampling.num_generations >= 2 or use 'reinforce'"
        )
    if valid is None:
        return entry.fn(rewards, group_size=group_size, eps=eps)
    if entry.takes_valid:
        return entry.fn(rewards, group_size=group_size, eps=eps, valid=valid)
    kept = kept_rows(valid, group_size if entry.grouped else 1).nonzero().squeeze(-1)
    return torch.zeros_like(rewards).index_copy_(0, kept, entry.fn(rewards[kept], group_size=group_size, eps=eps))


def kept_rows(valid: Tensor, group_size: int) -> Tensor:
    """[B] bool: the rows of the groups of ``group_size`` in which no row failed."""
    return valid.reshape(-1, group_size).all(-1).repeat_interleave(group_size)


class AdvantagesStage(Stage):
    """Sampled rows' rewards become advantages (``signal.advantage``); with a k1 reference
    they first lose ``kl_coef * sum_t (log pi - log pi_ref)``. The data's rewards
    (``signal.reward_data``) are the weight themselves, with no baseline, so data tokens
    are never pushed down. A batch without rewards (a mixed source's data batch under RL)
    is left as it is: every data token has weight 1. A failed row (``failed``) enters no
    group's statistics and gets no advantage."""

    name = "advantages"

    def __init__(self, signal: Sparse, reference: Reference | None = None):
        super().__init__()
        self.signal = signal
        self.k1 = reference if reference is not None and reference.estimator == "k1" else None

    def reads(self) -> set[str]:
        return {fields.RESPONSE_MASK} | ({fields.REFERENCE_LOGP} if self.k1 is not None else set())

    def writes(self) -> set[str]:
        return {fields.ADVANTAGES, fields.FAILED}

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
        group_size, failed = batch.get(fields.GROUP_SIZE, 1), batch.get(fields.FAILED)
        rows = None  # each row's position among the rows the estimator compares (its episode's)
        if fields.EPISODE in batch:
            # G episodes per prompt, each on one or more rows (a template that rewrote history):
            # the estimator compares episodes, and each row takes its episode's advantage
            rows = torch.as_tensor(batch[fields.EPISODE], device=rewards.device)
            first = estimators.first_rows(batch[fields.EPISODE], rewards.device)
            rewards, failed = rewards[first], (None if failed is None else failed[first])
        valid = None if failed is None else ~failed
        advantages = estimate_advantages(rewards, self.signal.advantage, group_size, self.signal.std_eps, valid)
        if valid is not None and not ADVANTAGES[self.signal.advantage].takes_valid:
            # an estimator that cannot leave a row out scored whole groups only: the rest are left out too
            grouped = ADVANTAGES[self.signal.advantage].grouped
            left_out = ~kept_rows(valid, group_size if grouped else 1)
            batch[fields.FAILED] = left_out if rows is None else left_out[rows]
        if rows is not None:
            advantages = advantages[rows]
        batch[fields.ADVANTAGES] = estimators.to_tokens(advantages, fields.loss_mask(batch))
