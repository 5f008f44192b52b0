"""Importance weighting: the sequence-level ratio some clips need, and every sampled
batch's ratio diagnostics (effective sample size, clip and truncation fractions, and the
trainer-sampler mismatch)."""

from __future__ import annotations

import lightning as L
import torch

from lightning_unified import batch as fields
from lightning_unified.losses.importance import mismatch_kl, ratio_diagnostics, ratio_from_log, sequence_log_ratio
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.registry import RATIOS
from lightning_unified.specs import Importance
from lightning_unified.stages.base import Stage


class ImportanceStage(Stage):
    """Token-level ratios need nothing here: the loss forms rho from the policy's log-probs
    and ``behaviour_logp`` one chunk at a time. A sequence-level ratio needs every token's
    log-prob first, so for ``sequence_clip`` this stage pays one no-grad forward before
    every update (with several updates per rollout, the policy has moved since the last).
    A ratio that reads the proximal policy (``decoupled_ppo_clip``) gets the trainer's own
    log-probs of the batch at its start, before its first update: one no-grad forward."""

    name = "importance"

    def __init__(self, importance: Importance):
        super().__init__()
        self.importance = importance
        # whether the batch being trained was sampled from older weights than the policy's
        self._stale = False

    def reads(self) -> set[str]:
        return {fields.RESPONSE_IDS, fields.RESPONSE_MASK}

    def writes(self) -> set[str]:
        out = {fields.LOG_RATIO} if self.importance.sequence_level else set()
        return out | ({fields.PROXIMAL_LOGP} if self.proximal else set())

    @property
    def proximal(self) -> bool:
        return RATIOS[self.importance.ratio].proximal

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        versions = batch.get(fields.POLICY_VERSION) or []
        self._stale = any(v != pl_module.progress["optimizer_steps"] for v in versions)
        if self.proximal and fields.is_sampled(batch):
            with torch.no_grad():
                logp = response_logprobs(pl_module.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                         batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK],
                                         temperature=pl_module.temperature, packing=pl_module.packing)
            batch[fields.PROXIMAL_LOGP] = logp * fields.loss_mask(batch)

    def on_update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> None:
        """Called by the module before each optimizer step, on that step's rows."""
        if not self.importance.sequence_level or not fields.is_sampled(batch):
            return
        logp = response_logprobs(pl_module.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                 batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK],
                                 temperature=pl_module.temperature, packing=pl_module.packing)
        # the sequence's ratio is over the tokens its sampler wrote, the ones in the loss
        batch[fields.LOG_RATIO] = sequence_log_ratio(logp, batch[fields.BEHAVIOUR_LOGP], fields.loss_mask(batch))

    def after_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, batch_idx: int) -> None:
        """The ratios the batch's last pass trained with (the only pass, with one update)."""
        if not fields.is_sampled(batch) or not isinstance(outputs, dict) or "target_logp" not in outputs:
            return
        mask = fields.loss_mask(batch)
        spec = self.importance
        if spec.sequence_level:
            log_ratio = sequence_log_ratio(outputs["target_logp"], batch[fields.BEHAVIOUR_LOGP], mask)
        else:
            log_ratio = (outputs["target_logp"] - batch[fields.BEHAVIOUR_LOGP]) * mask
        if self.proximal and fields.PROXIMAL_LOGP in batch:
            self._log_decoupled(pl_module, outputs, batch, mask)
            return
        clipped = spec.ratio in ("ppo_clip", "sequence_clip")
        stats = ratio_diagnostics(
            log_ratio, mask,
            advantages=batch.get(fields.ADVANTAGES) if clipped else None,
            eps_low=spec.eps_low if clipped else None,
            eps_high=spec.eps_high if clipped else None,
            truncate=spec.truncate if spec.ratio == "truncated" else None,
        )
        if spec.masks:
            stats["masked_fraction"] = self._masked_fraction(log_ratio, mask)
        kl = mismatch_kl(outputs["target_logp"], batch[fields.BEHAVIOUR_LOGP], mask)
        if pl_module.data_source.updates_per_batch == 1 and not self._stale:
            # one update per rollout, from weights the engine held: the loss's log-probs are the
            # trainer's own at the sampler's weights, so their gap is the engine's mismatch alone
            stats["mismatch_kl"] = kl
        else:
            # the sampler's weights are older than those the loss read (sync_every > 1, or an
            # earlier update of the same rollout): staleness and the mismatch together
            stats["stale_kl"] = kl
        for name, value in stats.items():
            pl_module.log(f"importance/{name}", value, batch_size=int(mask.sum()))

    def _masked_fraction(self, log_ratio, mask):
        """The share of loss tokens whose ratio lies outside [mask_low, mask_high]."""
        spec = self.importance
        rho = ratio_from_log(log_ratio[mask.bool()].float())
        low = spec.mask_low if spec.mask_low is not None else 0.0
        high = spec.mask_high if spec.mask_high is not None else float("inf")
        return ((rho < low) | (rho > high)).float().mean()

    def _log_decoupled(self, pl_module: L.LightningModule, outputs: dict, batch: dict, mask) -> None:
        """Decoupled PPO's two ratios apart: the behaviour weight pi_prox / mu (the sampler's
        staleness and its engine's mismatch: ``behaviour_kl``, truncated and masked
        fractions) and the clip's pi_theta / pi_prox (the batch's own updates:
        ``proximal_kl``, ``clip_fraction``)."""
        spec = self.importance
        proximal, behaviour = batch[fields.PROXIMAL_LOGP], batch[fields.BEHAVIOUR_LOGP]
        stats = ratio_diagnostics(proximal - behaviour, mask, truncate=spec.truncate)
        clip = ratio_diagnostics(outputs["target_logp"] - proximal, mask, advantages=batch.get(fields.ADVANTAGES),
                                 eps_low=spec.eps_low, eps_high=spec.eps_high)
        if "clip_fraction" in clip:
            stats["clip_fraction"] = clip["clip_fraction"]
        if spec.masks:
            stats["masked_fraction"] = self._masked_fraction(proximal - behaviour, mask)
        stats["behaviour_kl"] = mismatch_kl(proximal, behaviour, mask)
        stats["proximal_kl"] = mismatch_kl(outputs["target_logp"], proximal, mask)
        for name, value in stats.items():
            pl_module.log(f"importance/{name}", value, batch_size=int(mask.sum()))
