"""The contract between the module and its callbacks: what a callback may read of the
LightningModule it is attached to, and the per-update hook.

Any LightningModule that offers :class:`PolicyHost` can run these callbacks;
:class:`~lightning_unified.module.UnifiedModule` is the one this package ships.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L
from torch import nn
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class PolicyHost(Protocol):
    """What a callback may read of the module."""

    #: the causal LM being trained (a peft model with LoRA; FSDP2-sharded under ModelParallelStrategy)
    policy: nn.Module
    tokenizer: PreTrainedTokenizerBase
    #: the token ids that end a response: EOS and the chat template's end-of-turn token
    stop_token_ids: list[int]
    #: divides the policy's logits in the loss (the sampler's temperature unless set apart)
    temperature: float

    @property
    def progress(self) -> dict:
        """What the run has trained on so far: tokens_seen, train_seconds, optimizer_steps
        (the policy's version: a sampled row's ``policy_version`` is the one that sampled it)."""

    @property
    def max_new_tokens(self) -> int:
        """The longest response to sample or generate."""

    def policy_is_sharded(self) -> bool:
        """True when the policy's parameters are FSDP2 shards (a copy must gather first)."""

    def rollout_engine(self):
        """The rollout engine (:mod:`lightning_unified.engines`), synced with the policy."""


@runtime_checkable
class UpdateHook(Protocol):
    """A callback with per-update work: ``on_update_start`` runs before every optimizer
    step on that step's rows (several per batch when a rollout is replayed), after the
    batch's ``on_train_batch_start``. For fields that must see the policy as it is at this
    very update: a sequence-level importance ratio, a preference margin."""

    def on_update_start(self, trainer: L.Trainer, pl_module: PolicyHost, batch: dict) -> None: ...


def run_update_hooks(trainer: L.Trainer, pl_module: PolicyHost, batch: dict) -> None:
    """Call ``on_update_start`` of every callback the trainer holds that has one: the
    module's own pipeline and any a user added to the Trainer by hand, in the trainer's order."""
    for callback in trainer.callbacks:
        if isinstance(callback, UpdateHook):
            callback.on_update_start(trainer, pl_module, batch)
