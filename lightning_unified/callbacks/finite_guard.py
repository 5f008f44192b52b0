"""No non-finite step reaches the weights: a NaN or infinite loss or gradient is caught
before the optimizer step, and that step is skipped, or the run stops with a diagnostic.

Skipping sets every gradient to None, so the optimizer leaves the weights AND its own
state (moments, step counts) untouched for that step; the step counter and the learning
rate schedule still advance. The decision is all-reduced, so every rank skips together
and DDP never sees ranks disagree.
"""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.losses.aggregation import all_reduce_sum

GUARD_MODES = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient."""


def non_finite_fields(batch: dict) -> list[str]:
    """The batch's floating-point fields (rewards, advantages, log-probs ...) that hold a
    NaN or an infinity where they count (masked padding is zero by construction)."""
    bad = []
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad.append(name)
        elif name == fields.TEACHER and value is not None:
            hidden = value.hidden if value.hidden is not None else value.logits
            if not torch.isfinite(hidden).all():
                bad.append(f"{name}.{'hidden' if value.hidden is not None else 'logits'}")
    return bad


class NonFiniteGuard(L.Callback):
    """``mode="skip"``: skip each bad step and count it (``train/skipped_steps``), but stop
    after ``max_consecutive`` bad steps in a row; ``mode="stop"``: stop at the first."""

    def __init__(self, mode: str = "skip", max_consecutive: int = 3):
        if mode not in GUARD_MODES:
            raise ValueError(f"guard.mode must be one of {GUARD_MODES}, got {mode!r}")
        if max_consecutive < 1:
            raise ValueError(f"guard.max_consecutive must be >= 1, got {max_consecutive}")
        self.mode, self.max_consecutive = mode, max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._findings: list[str] = []
        self._batch_idx = -1

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        # the last stage of the pipeline: every field of this micro-batch is in place
        self._batch_idx = batch_idx
        bad = non_finite_fields(batch)
        if bad:
            self._findings.append(f"batch {batch_idx}: {', '.join(bad)}")

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            self._findings.append(f"batch {self._batch_idx}: loss")

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        local_bad = any(not torch.isfinite(g).all() for g in grads)
        # one small all-reduce: every rank makes the same decision
        flag = all_reduce_sum(torch.tensor([float(local_bad)], device=pl_module.device))
        if float(flag[0]) == 0:
            self.consecutive = 0
            self._findings.clear()
            pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
            return
        self.skipped += 1
        self.consecutive += 1
        findings = "; ".join(self._findings) or "the gradient only (every batch field and the loss were finite)"
        self._findings.clear()
        if self.mode == "stop" or self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {trainer.global_step}: non-finite gradient ({findings}); "
                + ("guard.mode=stop" if self.mode == "stop" else f"{self.consecutive} bad steps in a row "
                   f"(guard.max_consecutive={self.max_consecutive})")
            )
        for param in pl_module.parameters():
            param.grad = None  # the optimizer skips parameters without a gradient: weights and state stay
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)

    @override
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.consecutive = state_dict.get("consecutive", 0)
