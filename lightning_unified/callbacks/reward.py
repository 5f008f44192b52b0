"""Sparse signal: rewards on the decoded responses, then advantages."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_unified.losses import advantages as estimators
from lightning_unified import batch as fields
from lightning_unified.specs import Reward, Sparse


def reward_name(reward: Reward) -> str:
    fn = getattr(reward.fn, "func", reward.fn)
    return getattr(fn, "__name__", type(fn).__name__)


def compute_rewards(rewards: list[Reward], **inputs) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of every reward function, [B], and each one's batch mean."""
    total, parts = None, {}
    for reward in rewards:
        value = torch.as_tensor(reward.fn(**inputs), dtype=torch.float32)
        if value.shape != (len(inputs["completions"]),):
            raise ValueError(
                f"reward {reward_name(reward)} returned shape {tuple(value.shape)}; it must return one "
                f"float per completion, shape ({len(inputs['completions'])},)"
            )
        parts[reward_name(reward)] = value.mean()
        total = reward.weight * value if total is None else total + reward.weight * value
    return total, parts


def estimate_advantages(rewards: Tensor, estimator: str, group_size: int) -> Tensor:
    """[B] rewards to [B] advantages. Groups are consecutive rows sharing a prompt."""
    if estimator == "reinforce":
        return estimators.reinforce_advantages(rewards)
    if group_size < 2:
        raise ValueError(
            f"signal.advantage={estimator!r} compares responses to the same prompt, but the batch has "
            f"{group_size} per prompt; set data_source.sampling.num_generations >= 2 or use 'reinforce'"
        )
    fn = {"rloo": estimators.rloo_advantages, "grpo": estimators.grpo_advantages,
          "dr_grpo": estimators.dr_grpo_advantages}[estimator]
    return fn(rewards, group_size=group_size)


class RewardCallback(L.Callback):
    """Scores sampled responses (RL), or the dataset's when ``reward_data`` is set
    (reward-weighted SFT: the reward itself is the weight, with no baseline, so data tokens
    are never pushed down)."""

    def __init__(self, signal: Sparse):
        self.signal = signal

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        sampled = fields.BEHAVIOUR_LOGP in batch
        if not (sampled or self.signal.reward_data):
            return  # off-policy data under plain SFT: every data token has reward 1
        fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK, who="rewards")
        response_ids, mask = batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK]
        tokenizer = pl_module.tokenizer
        completions = tokenizer.batch_decode(torch.where(mask.bool(), response_ids, tokenizer.pad_token_id),
                                             skip_special_tokens=True)
        references = batch.get(fields.REFERENCES, [None] * len(completions))
        rewards, parts = compute_rewards(self.signal.rewards, completions=completions, references=references,
                                         completion_ids=response_ids, completion_mask=mask)
        rewards = rewards.to(response_ids.device)
        group_size = batch.get(fields.GROUP_SIZE, 1)
        advantages = estimate_advantages(rewards, self.signal.advantage, group_size) if sampled else rewards
        batch[fields.REWARDS] = rewards
        batch[fields.ADVANTAGES] = estimators.to_tokens(advantages, mask)
        n = rewards.numel()
        for name, value in parts.items():
            pl_module.log(f"reward/{name}", value, batch_size=n)
        for name, value in estimators.reward_metrics(rewards, group_size=group_size if group_size > 1 else None).items():
            pl_module.log(f"reward/{name}", value, batch_size=n, prog_bar=name == "reward_mean")
