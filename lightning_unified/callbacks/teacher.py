"""Dense signal: a frozen teacher scores each batch's prompt + response once, and hands the
loss its hidden states and head (or a top-k, or one log-prob per token), never [B, R, V]."""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.models.loading import (
    check_same_vocabulary,
    load_causal_lm,
    output_head,
    response_hidden,
)
from lightning_unified.losses.objective import TeacherLogits, target_logprobs, topk_logprobs
from lightning_unified.specs import Dense


class TeacherCallback(L.Callback):
    def __init__(self, signal: Dense):
        self.signal = signal
        self.teacher = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.teacher is None:
            teacher = load_causal_lm(self.signal.teacher, **self.signal.teacher_options)
            check_same_vocabulary(pl_module.policy, pl_module.tokenizer, teacher, self.signal.teacher,
                                  f"teacher {self.signal.teacher}")
            # kept out of the module so it is never trained, checkpointed or wrapped by DDP
            self.teacher = teacher.eval().requires_grad_(False)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.to(pl_module.device)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="teacher scoring")
        signal = self.signal
        with torch.no_grad():
            hidden = response_hidden(self.teacher, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                     batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK])  # [B, R, H_t]
            weight, bias = output_head(self.teacher)
            if signal.top_k:
                ids, logp = topk_logprobs(hidden, weight, signal.top_k, head_bias=bias, temperature=signal.temperature)
                batch[fields.TEACHER_TOPK_IDS], batch[fields.TEACHER_TOPK_LOGP] = ids, logp
            elif signal.divergence == "sampled_reverse_kl":
                batch[fields.TEACHER_TOKEN_LOGP] = target_logprobs(
                    hidden, weight, batch[fields.RESPONSE_IDS], head_bias=bias, temperature=signal.temperature
                )
            else:
                batch[fields.TEACHER] = TeacherLogits(
                    hidden=hidden, head_weight=weight, head_bias=bias, temperature=signal.temperature
                )
