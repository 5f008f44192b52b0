"""Importance weighting: the sequence-level ratio some clips need, and every sampled
batch's ratio diagnostics (effective sample size, clip and truncation fractions)."""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.losses.importance import ratio_diagnostics, sequence_log_ratio
from lightning_unified.models.loading import response_hidden
from lightning_unified.specs import Importance


class ImportanceCallback(L.Callback):
    """Token-level ratios need nothing here: the loss forms rho from the policy's log-probs
    and ``behaviour_logp`` one chunk at a time. A sequence-level ratio needs every token's
    log-prob first, so for ``sequence_clip`` this callback pays one no-grad forward."""

    def __init__(self, importance: Importance):
        self.importance = importance

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if self.importance.ratio != "sequence_clip" or fields.BEHAVIOUR_LOGP not in batch:
            return
        mask = batch[fields.RESPONSE_MASK]
        with torch.no_grad():
            hidden = response_hidden(pl_module.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                     batch[fields.RESPONSE_IDS], mask)
            # through the head's own forward, so a sharded (FSDP2) head is gathered first
            logp = pl_module.policy.get_output_embeddings()(
                hidden, target_ids=batch[fields.RESPONSE_IDS], temperature=pl_module.temperature
            )
        batch[fields.LOG_RATIO] = sequence_log_ratio(logp, batch[fields.BEHAVIOUR_LOGP], mask)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, batch_idx: int) -> None:
        if fields.BEHAVIOUR_LOGP not in batch or not isinstance(outputs, dict) or "target_logp" not in outputs:
            return
        mask = batch[fields.RESPONSE_MASK]
        log_ratio = batch.get(fields.LOG_RATIO)
        if log_ratio is None:
            log_ratio = (outputs["target_logp"] - batch[fields.BEHAVIOUR_LOGP]) * mask
        spec = self.importance
        clipped = spec.ratio in ("ppo_clip", "sequence_clip")
        stats = ratio_diagnostics(
            log_ratio, mask,
            advantages=batch.get(fields.ADVANTAGES) if clipped else None,
            eps_low=spec.eps_low if clipped else None,
            eps_high=spec.eps_high if clipped else None,
            truncate=spec.truncate if spec.ratio == "truncated" else None,
        )
        for name, value in stats.items():
            pl_module.log(f"importance/{name}", value, batch_size=int(mask.sum()))
