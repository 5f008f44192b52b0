"""Preference signal: which response of each pair is chosen (from the data, or from rewards
on sampled responses), then before every update the pairs' sequence-level weights."""

from __future__ import annotations

import lightning as L

from lightning_unified import batch as fields
from lightning_unified.failures import mark_failed, report
from lightning_unified.lightning_private import writes_logs_now
from lightning_unified.metrics import rewards_to_device
from lightning_unified.losses.advantages import reward_metrics
from lightning_unified.rewards.scoring import compute_rewards, decode_prompts, decode_responses, names_parameter
from lightning_unified.losses.preference import pairs_from_rewards, preference_terms
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.specs import Preference
from lightning_unified.stages.base import Stage


class PreferenceStage(Stage):
    """Data pairs arrive marked (``preference``: +1 chosen, -1 rejected, in groups of 2). A
    sampled batch (online DPO) is scored by ``signal.rewards``, and each prompt's best and
    worst samples become its pair; a prompt whose samples all score the same has no pair
    and trains nothing (``preference/usable_pairs`` says how many did); a sample the rewards
    cannot score is in no pair (``failed``, counted in ``rewards/failures``).

    The weights need the policy's whole-sequence log-probs at the moment of the update, so
    :meth:`on_update_start` pays one no-grad forward per optimizer step."""

    name = "preference"

    def __init__(self, signal: Preference):
        super().__init__()
        self.signal = signal

    def reads(self) -> set[str]:
        needs = {fields.RESPONSE_IDS, fields.RESPONSE_MASK}
        return needs | {fields.REFERENCE_LOGP} if self.signal.needs_reference else needs

    def writes(self) -> set[str]:
        return {fields.PREFERENCE, fields.REWARDS, fields.COMPLETIONS, fields.PREFERENCE_WEIGHT, fields.PREFERENCE_LOSS,
                fields.FAILED}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK, who="signal=preference")
        if fields.PREFERENCE in batch:
            return  # pairs from the data
        if not fields.is_sampled(batch):
            raise ValueError(
                "signal=preference on data without pairs: give the data 'chosen' and 'rejected' columns (the built-in "
                "task: task.pairs=true), or sample the responses (data_source=on_policy) and set signal.rewards"
            )
        if not self.signal.rewards:
            raise ValueError("signal=preference on sampled responses (online DPO) needs signal.rewards to pick "
                             "each prompt's chosen and rejected samples")
        n = batch[fields.RESPONSE_IDS].shape[0]
        completions = decode_responses(pl_module.tokenizer, batch)
        batch[fields.COMPLETIONS] = completions
        rewards, _, failed, values = compute_rewards(
            self.signal.rewards, completions=completions, references=batch.get(fields.REFERENCES, [None] * n),
            completion_ids=batch[fields.RESPONSE_IDS], completion_mask=batch[fields.RESPONSE_MASK],
            # decoded only for functions that name them
            **({"prompts": decode_prompts(pl_module.tokenizer, batch)}
               if any(names_parameter(r.fn, "prompts") for r in self.signal.rewards) else {}))
        # a row a function cannot score is in no pair, counted; the run goes on
        mark_failed(batch, [f.row for f in failed])
        report(pl_module, "rewards", n, failed)
        # each function's mean and spread over every rank (reward/<name>, reward/<name>_std)
        rewards = rewards_to_device(pl_module.step_metrics if writes_logs_now(trainer) else None, rewards, values,
                                    batch[fields.RESPONSE_IDS].device)
        batch[fields.REWARDS] = rewards
        valid = ~batch[fields.FAILED]
        batch[fields.PREFERENCE] = pairs_from_rewards(rewards, batch.get(fields.GROUP_SIZE, 1), valid)
        pl_module.log("reward/reward_mean", reward_metrics(rewards, valid=valid)["reward_mean"], batch_size=n,
                      prog_bar=True)

    def on_update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> None:
        """Called by the module before each optimizer step, on that step's rows."""
        fields.require(batch, fields.PREFERENCE, who="signal=preference")
        if self.signal.needs_reference:
            fields.require(batch, fields.REFERENCE_LOGP, who=f"signal.loss={self.signal.loss}")
        logp = response_logprobs(pl_module.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                 batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK],
                                 temperature=pl_module.temperature, packing=pl_module.packing)
        # a pair's margin sums its responses' tokens in the loss (the last assistant turn of a conversation)
        terms = preference_terms(logp, fields.loss_mask(batch), batch[fields.PREFERENCE], batch.get(fields.GROUP_SIZE, 2),
                                 batch.get(fields.REFERENCE_LOGP), loss=self.signal.loss, beta=self.signal.beta,
                                 gamma=self.signal.gamma)
        batch[fields.PREFERENCE_WEIGHT] = terms.weight
        batch[fields.PREFERENCE_LOSS] = terms.loss
        pairs = terms.margin.numel()
        pl_module.log("preference/usable_pairs", float(pairs), batch_size=1)
        if pairs:
            pl_module.log("preference/loss", terms.pair_loss.mean(), batch_size=pairs, prog_bar=True)
            pl_module.log("preference/margin", terms.margin.mean(), batch_size=pairs)
            pl_module.log("preference/accuracy", (terms.margin > 0).float().mean(), batch_size=pairs, prog_bar=True)
            pl_module.log("preference/chosen_score", terms.chosen_score.mean(), batch_size=pairs)
            pl_module.log("preference/rejected_score", terms.rejected_score.mean(), batch_size=pairs)
