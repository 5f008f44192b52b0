"""Several optimizer steps per sampled batch (``data_source.updates_per_rollout`` x
``minibatches``): which rows each update trains on, and the whole rollout's log-probs
assembled from its updates."""

from __future__ import annotations

import torch

from lightning_unified import batch as fields


class RolloutReplay:
    """Update ``u`` of a batch trains on mini-batch ``u % minibatches``: contiguous whole
    groups (a prompt's samples, a preference pair), in order."""

    def __init__(self, updates_per_rollout: int = 1, minibatches: int = 1):
        self.minibatches = minibatches
        self.updates = updates_per_rollout * minibatches
        self.index = 0  # the update running now
        self._pass_logp: torch.Tensor | None = None

    @classmethod
    def for_data_source(cls, data_source) -> RolloutReplay:
        return cls(getattr(data_source, "updates_per_rollout", 1), getattr(data_source, "minibatches", 1))

    def check_accumulation(self, accumulate_grad_batches: int) -> None:
        """Replaying a rollout and accumulating micro-batches both split the optimizer step;
        together they would interleave, so the pair is refused."""
        if self.updates > 1 and accumulate_grad_batches != 1:
            raise ValueError(
                f"data_source.updates_per_rollout x minibatches = {self.updates} optimizer steps per batch cannot "
                f"be combined with trainer.accumulate_grad_batches={accumulate_grad_batches}: set it to 1 and make "
                f"the batch larger instead")

    def step(self, optimizer, closure) -> None:
        """Every update of one batch: the closure (training_step + backward) runs once per
        optimizer step, each time on the next mini-batch of the same rollout."""
        for update in range(self.updates):
            self.index = update
            optimizer.step(closure=closure)
        self.index = 0

    def rows(self, batch: dict) -> tuple[int, int]:
        group = batch.get(fields.GROUP_SIZE, 1)
        groups = batch[fields.RESPONSE_IDS].shape[0] // group
        if groups < self.minibatches:
            raise ValueError(f"data_source.minibatches={self.minibatches} splits a batch by prompt, but this batch has "
                             f"{groups} prompts; use fewer mini-batches or more prompts per batch")
        part = self.index % self.minibatches
        return group * (groups * part // self.minibatches), group * (groups * (part + 1) // self.minibatches)

    def select(self, batch: dict) -> dict:
        """The rows this update trains on (the whole batch with one update)."""
        if self.updates == 1:
            return batch
        return fields.select_rows(batch, *self.rows(batch))

    def rollout_logp(self, batch: dict, logp: torch.Tensor) -> torch.Tensor:
        """[B, R] the loss's log-probs of every row of the batch: this update's rows written
        into a buffer, so the batch's last update hands callbacks the whole final pass."""
        if self.updates == 1:
            return logp
        shape = batch[fields.RESPONSE_IDS].shape
        if self.index == 0 or self._pass_logp is None or self._pass_logp.shape != shape:
            self._pass_logp = torch.zeros(shape, dtype=logp.dtype, device=logp.device)
        start, stop = self.rows(batch)
        self._pass_logp[start:stop] = logp
        return self._pass_logp
