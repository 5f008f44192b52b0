"""The contract between the module and its stages: what a stage may read of the
LightningModule that runs it (and what a Lightning callback may, for the per-update hook).

Any LightningModule that offers :class:`PolicyHost` can run these stages;
:class:`~lightning_unified.module.UnifiedModule` is the one this package ships. Besides
these, a stage logs through the module's ``log`` and reads its ``device``, as any
LightningModule has them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L
from torch import nn
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class PolicyHost(Protocol):
    """What a stage may read of the module."""

    #: the causal LM being trained (a peft model with LoRA; FSDP2-sharded under ModelParallelStrategy)
    policy: nn.Module
    tokenizer: PreTrainedTokenizerBase
    #: the token ids that end a response: EOS and the chat template's end-of-turn token
    stop_token_ids: list[int]
    #: divides the policy's logits in the loss (the sampler's temperature unless set apart)
    temperature: float
    #: the run's data source (OffPolicy or OnPolicy): updates per batch, sampling settings
    data_source: object
    #: padding-free forwards, for every forward a stage makes on the batch's sequences
    packing: object
    #: the rollout engine's owner: ``with rollouts.engine_for(step) as engine`` (started,
    #: woken and synced), the version of the weights it holds, its sync seconds
    rollouts: object
    #: the rows that failed, by kind, and the run's limit on them (a
    #: :class:`~lightning_unified.failures.FailedRows`: ``lightning_unified.failures.report``)
    failures: object
    #: the step's diagnostics kept on the device until its one read (a
    #: :class:`~lightning_unified.metrics.DeviceMetrics`: a stage adds its scalars there, not
    #: through ``log``, to have them reduced over ranks without a read of its own)
    step_metrics: object

    @property
    def max_new_tokens(self) -> int:
        """The longest response to sample or generate."""

    @property
    def progress(self) -> dict:
        """What the run has trained on so far: tokens_seen, train_seconds, optimizer_steps
        (the policy's version: a sampled row's ``policy_version`` is the one that sampled it)."""

    def policy_is_sharded(self) -> bool:
        """True when the policy's parameters are FSDP2 shards (a copy must gather first)."""


@runtime_checkable
class UpdateHook(Protocol):
    """A Lightning callback with per-update work: ``on_update_start`` runs before every
    optimizer step on that step's rows (several per batch when a rollout is replayed), after
    the stages' own ``on_update``. For fields that must see the policy as it is at this very
    update; a :class:`~lightning_unified.stages.Stage` does the same with ``on_update``."""

    def on_update_start(self, trainer: L.Trainer, pl_module: PolicyHost, batch: dict) -> None: ...


def run_update_hooks(trainer: L.Trainer, pl_module: PolicyHost, batch: dict) -> None:
    """Call ``on_update_start`` of every callback the trainer holds that has one (any a user
    added to the Trainer by hand), in the trainer's order."""
    for callback in trainer.callbacks:
        if isinstance(callback, UpdateHook):
            callback.on_update_start(trainer, pl_module, batch)
