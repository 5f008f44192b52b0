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
from lightning_unified.lightning_private import writes_logs_now

GUARD_MODES = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient."""


def _checked_fields(batch: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the batch's floating-point fields (rewards, advantages, log-probs,
    the teacher's hidden states or logits). Integer fields and masks cannot hold a NaN."""
    out = []
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out.append((name, value))
        elif name == fields.TEACHER and value is not None:
            hidden = value.hidden if value.hidden is not None else value.logits
            out.append((f"{name}.{'hidden' if value.hidden is not None else 'logits'}", hidden))
    return out


def finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[n] bool on the device: each tensor holds only finite values. One fused multi-tensor
    max-abs per tensor (a NaN or an infinity anywhere makes it non-finite, and a max never
    overflows as a sum of squares would); nothing is read back to the host."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    # FSDP2 gradients are shards (DTensor): each rank checks its own, the caller's all-reduce joins them
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return torch.isfinite(torch.stack(torch._foreach_norm([t.detach() for t in local], ord=float("inf"))))


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
        # this step's checks, kept on the device until the one read in on_before_optimizer_step:
        # (which micro-batch, the names checked, [n] finite flags)
        self._pending: list[tuple[str, list[str], torch.Tensor]] = []
        self._batch_idx, self._batch = -1, None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        # the module's stages add their fields after this hook: they are checked before backward
        self._batch_idx, self._batch = batch_idx, batch

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Every field of this micro-batch is in place (the stages ran, and the update's own
        fields were refreshed): its floating-point fields and the loss, checked on the device."""
        checked = _checked_fields(self._batch or {})
        if checked:
            self._pending.append((f"batch {self._batch_idx}", [name for name, _ in checked],
                                  finite_flags([t for _, t in checked]).to(pl_module.device)))
        self._pending.append((f"batch {self._batch_idx}", ["loss"], torch.isfinite(loss.detach()).reshape(1)))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        self._batch = None  # checked: the batch (a teacher's hidden states among its fields) is not kept alive

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grads_ok = finite_flags(grads).all() if grads else torch.ones((), dtype=torch.bool, device=pl_module.device)
        # one small all-reduce, then the step's one read back to the host: whether to call the
        # optimizer at all is a host decision, and every rank must make the same one
        flag = all_reduce_sum((~grads_ok).to(torch.float64).reshape(1).to(pl_module.device))
        bad_step = bool(flag[0] > 0)
        pending, self._pending = self._pending, []
        if not bad_step:
            self.consecutive = 0
            # the count changes only on a skipped step, which always logs it; otherwise it is
            # logged on the steps Lightning writes (a log call costs about a millisecond)
            if writes_logs_now(trainer):
                pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
            return
        bad = []
        for where, names, flags in pending:
            found = [name for name, ok in zip(names, flags.tolist()) if not ok]
            if found:
                bad.append(f"{where}: {', '.join(found)}")
        self.skipped += 1
        self.consecutive += 1
        findings = "; ".join(bad) or "the gradient only (every batch field and the loss were finite)"
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
