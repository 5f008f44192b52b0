"""Sparse signal: rewards on the decoded responses (or the data's reward column), an
optional k1 KL penalty, then advantages."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.losses import advantages as estimators
from lightning_unified.losses.aggregation import all_reduce_sum
from lightning_unified.rewards.scoring import compute_rewards, decode_prompts, decode_responses, names_parameter
from lightning_unified.specs import Reference, Sparse


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


class RewardCallback(L.Callback):
    """Scores sampled responses (RL), or the dataset's when ``reward_data`` is set
    (reward-weighted SFT: the reward itself is the weight, with no baseline, so data tokens
    are never pushed down). With a k1 reference, the sampled responses' rewards lose
    ``kl_coef * sum_t (log pi - log pi_ref)`` before their advantages."""

    def __init__(self, signal: Sparse, reference: Reference | None = None):
        self.signal = signal
        self.needs_prompts = any(names_parameter(r.fn, "prompts") for r in signal.rewards)
        self.k1 = reference if reference is not None and reference.estimator == "k1" else None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        sampled = fields.BEHAVIOUR_LOGP in batch
        if not (sampled or self.signal.reward_data):
            return  # off-policy data under plain SFT: every data token has reward 1
        fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK, who="rewards")
        response_ids, mask = batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK]
        n = response_ids.shape[0]
        if not sampled and fields.REWARDS in batch:
            rewards = batch[fields.REWARDS].float()  # the data's own reward column
        else:
            if not self.signal.rewards:
                raise ValueError("signal.reward_data=true needs a 'reward' column in the data or an entry in "
                                 "signal.rewards")
            completions = decode_responses(pl_module.tokenizer, batch)
            batch[fields.COMPLETIONS] = completions
            rewards, parts = compute_rewards(
                self.signal.rewards, completions=completions, references=batch.get(fields.REFERENCES, [None] * n),
                completion_ids=response_ids, completion_mask=mask,
                # decoded only for functions that name them (a reward model does)
                **({"prompts": decode_prompts(pl_module.tokenizer, batch)} if self.needs_prompts else {}))
            for name, value in parts.items():
                pl_module.log(f"reward/{name}", value, batch_size=n)
        rewards = rewards.to(response_ids.device)
        batch[fields.REWARDS] = rewards
        if sampled and self.k1 is not None:
            fields.require(batch, fields.REFERENCE_LOGP, who="the k1 reference penalty")
            rewards = estimators.kl_penalized_rewards(rewards, batch[fields.BEHAVIOUR_LOGP], batch[fields.REFERENCE_LOGP],
                                                      fields.loss_mask(batch), kl_coef=self.k1.kl_coef)
        group_size = batch.get(fields.GROUP_SIZE, 1)
        advantages = (estimate_advantages(rewards, self.signal.advantage, group_size, self.signal.std_eps)
                      if sampled else rewards)
        batch[fields.ADVANTAGES] = estimators.to_tokens(advantages, fields.loss_mask(batch))
        for name, value in estimators.reward_metrics(batch[fields.REWARDS],
                                                     group_size=group_size if group_size > 1 else None).items():
            pl_module.log(f"reward/{name}", value, batch_size=n, prog_bar=name == "reward_mean")
