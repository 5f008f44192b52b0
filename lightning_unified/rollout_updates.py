"""The optimizer steps one sampled batch makes (``data_source.updates_per_rollout`` epochs x
``minibatches``): which rows each step trains on, and the whole rollout's log-probs
assembled from its steps."""

from __future__ import annotations

import torch

from lightning_unified import batch as fields


class RolloutUpdates:
    """A rollout split into ``minibatches`` parts (contiguous whole groups: a prompt's
    samples, a preference pair; in order), each part trained once per epoch, for
    ``epochs`` epochs (PPO's epochs, GRPO's num_iterations, verl's ppo_epochs). Update
    ``update`` (set by :func:`lightning_unified.step.make_updates`, which makes them) trains
    on part ``update % minibatches``."""

    def __init__(self, epochs: int = 1, minibatches: int = 1):
        self.minibatches = minibatches
        self.count = epochs * minibatches  # optimizer steps per batch
        self.update = 0  # the update being made
        self._pass_logp: torch.Tensor | None = None

    @classmethod
    def for_data_source(cls, data_source) -> RolloutUpdates:
        return cls(getattr(data_source, "updates_per_rollout", 1), getattr(data_source, "minibatches", 1))

    def rows(self, batch: dict) -> tuple[int, int]:
        """[start, stop) of the rows the running update trains on."""
        group = batch.get(fields.GROUP_SIZE, 1)
        groups = batch[fields.RESPONSE_IDS].shape[0] // group
        if groups < self.minibatches:
            raise ValueError(f"data_source.minibatches={self.minibatches} splits a batch by prompt, but this batch has "
                             f"{groups} prompts; use fewer mini-batches or more prompts per batch")
        part = self.update % self.minibatches
        return group * (groups * part // self.minibatches), group * (groups * (part + 1) // self.minibatches)

    def select(self, batch: dict) -> dict:
        """The rows the running update trains on (the whole batch with one update)."""
        if self.count == 1:
            return batch
        return select_rows(batch, *self.rows(batch))

    def rollout_logp(self, batch: dict, logp: torch.Tensor) -> torch.Tensor:
        """[B, R] the loss's log-probs of every row of the batch: this update's rows written
        into a buffer, so the batch's last update hands callbacks the whole final pass."""
        if self.count == 1:
            return logp
        shape = batch[fields.RESPONSE_IDS].shape
        if self.update == 0 or self._pass_logp is None or self._pass_logp.shape != shape:
            self._pass_logp = torch.zeros(shape, dtype=logp.dtype, device=logp.device)
        start, stop = self.rows(batch)
        self._pass_logp[start:stop] = logp
        return self._pass_logp


def select_rows(batch: dict, start: int, stop: int) -> dict:
    """The rows ``start:stop`` of every per-row field: a mini-batch of a rollout. Tensors and
    lists are sliced (tensor slices are views, no copy); objects with a ``rows`` method (the
    teacher's :class:`~lightning_unified.losses.objective.TeacherLogits`) slice themselves."""
    out = {}
    for name, value in batch.items():
        if name in fields.BATCH_WIDE_FIELDS or value is None:
            out[name] = value
        elif hasattr(value, "rows"):
            out[name] = value.rows(start, stop)
        elif isinstance(value, (list, tuple)) or hasattr(value, "shape"):
            out[name] = value[start:stop]
        else:
            raise TypeError(f"batch field {name!r} ({type(value).__name__}) cannot be split into mini-batches; "
                            f"give it one value per row, or list it in BATCH_WIDE_FIELDS")
    return out
