"""The rewards stage: reward functions on the decoded responses (sampled ones, or the data's
with ``signal.reward_data``), or the data's own reward column."""

from __future__ import annotations

import lightning as L

from lightning_unified import batch as fields
from lightning_unified.failures import mark_failed, report
from lightning_unified.lightning_private import writes_logs_now
from lightning_unified.losses import advantages as estimators
from lightning_unified.metrics import rewards_to_device
from lightning_unified.rewards.scoring import compute_rewards, decode_prompts, decode_responses, names_parameter
from lightning_unified.specs import Sparse
from lightning_unified.stages.base import Stage


class RewardsStage(Stage):
    """Scores sampled responses (RL), or the dataset's when ``reward_data`` is set
    (reward-weighted SFT), with ``signal.rewards``; the data's ``reward`` column, when it
    has one, is the data's reward as it is. A row the functions cannot score (one raises on
    it, or scores it NaN) is marked ``failed`` and counted in ``rewards/failures``."""

    name = "rewards"

    def __init__(self, signal: Sparse):
        super().__init__()
        self.signal = signal
        self.needs_prompts = any(names_parameter(r.fn, "prompts") for r in signal.rewards)

    def reads(self) -> set[str]:
        return {fields.RESPONSE_IDS, fields.RESPONSE_MASK}

    def writes(self) -> set[str]:
        return {fields.REWARDS, fields.COMPLETIONS, fields.FAILED}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        sampled = fields.is_sampled(batch)
        if not (sampled or self.signal.reward_data):
            return  # off-policy data under plain SFT: every data token has reward 1
        fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK, who="rewards")
        response_ids, mask = batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK]
        n = response_ids.shape[0]
        if not sampled and fields.REWARDS in batch:
            rewards = batch[fields.REWARDS].float()  # the data's own reward column
        elif sampled and fields.ENVIRONMENT_REWARDS in batch:
            rewards = batch[fields.ENVIRONMENT_REWARDS]  # each row's episode's, from its environment
            batch[fields.COMPLETIONS] = decode_responses(pl_module.tokenizer, batch)
        else:
            if not self.signal.rewards:
                raise ValueError("signal.reward_data=true needs a 'reward' column in the data or an entry in "
                                 "signal.rewards")
            completions = decode_responses(pl_module.tokenizer, batch)
            batch[fields.COMPLETIONS] = completions
            rewards, _, failed, values = compute_rewards(
                self.signal.rewards, completions=completions, references=batch.get(fields.REFERENCES, [None] * n),
                completion_ids=response_ids, completion_mask=mask,
                # decoded only for functions that name them (a reward model does)
                **({"prompts": decode_prompts(pl_module.tokenizer, batch)} if self.needs_prompts else {}))
            # a row a function cannot score is left out of the loss and counted; the run goes on
            mark_failed(batch, [f.row for f in failed])
            report(pl_module, "rewards", n, failed)
            # each function's mean and spread over every rank (reward/<name>, reward/<name>_std)
            rewards = rewards_to_device(pl_module.step_metrics if writes_logs_now(trainer) else None, rewards, values,
                                        response_ids.device)
        batch[fields.REWARDS] = rewards.to(response_ids.device)
        group_size = batch.get(fields.GROUP_SIZE, 1)
        rewards, valid = batch[fields.REWARDS], batch.get(fields.FAILED)
        valid = None if valid is None else ~valid
        if fields.EPISODE in batch:  # an episode's rows share its reward: count it once
            first = estimators.first_rows(batch[fields.EPISODE], rewards.device)
            rewards, valid = rewards[first], (None if valid is None else valid[first])
        for name, value in estimators.reward_metrics(rewards, group_size=group_size if group_size > 1 else None,
                                                     valid=valid).items():
            pl_module.log(f"reward/{name}", value, batch_size=n, prog_bar=name == "reward_mean")
