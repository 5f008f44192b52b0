"""The policy's weights as vLLM reads them: a vLLM ``WeightSource`` under the Hugging Face
checkpoint names, each FSDP2 shard gathered only when its turn comes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from lightning_unified.engines.parameter_copy import checkpoint_name
from lightning_unified.models.lora import is_lora


def checkpoint_entries(policy: nn.Module) -> list[tuple[str, Tensor]]:
    """``(HF name, tensor)`` for every weight a checkpoint of the policy holds, in the state
    dict's order: peft's prefixes and ``.base_layer.`` dropped, the adapters' own tensors
    left out, and a weight tied to an earlier one (the output head tied to the embedding)
    left out too: vLLM's loaders take it from its twin, and sending it would cost a second
    embedding's bytes. The tensors are the parameters themselves, or their FSDP2 shards:
    nothing is gathered or copied here."""
    lora = is_lora(policy)
    entries, seen = [], set()
    for name, tensor in policy.state_dict(keep_vars=True).items():
        if (lora and "lora_" in name) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries.append((checkpoint_name(name, lora), tensor))
    return entries


def wire_dtype_of(tensor: Tensor, wire_dtype: torch.dtype | None) -> torch.dtype:
    """What ``tensor`` travels as: floating weights in ``wire_dtype``, anything else as it is."""
    return wire_dtype if wire_dtype is not None and tensor.dtype.is_floating_point else tensor.dtype


def materialise(tensor: Tensor, wire_dtype: torch.dtype | None) -> Tensor:
    """The whole tensor, gathered if sharded (a collective), detached, in its wire dtype."""
    if hasattr(tensor, "full_tensor"):
        with torch.inference_mode(False):  # a gathered DTensor is no inference tensor
            tensor = tensor.full_tensor()
    return tensor.detach().to(wire_dtype_of(tensor, wire_dtype))


class PolicySource(WeightSource):
    """The policy's checkpoint weights for a vLLM weight-transfer engine.

    ``metadata()`` reads the global shapes (a DTensor's ``shape`` is the full one) and
    gathers nothing. Iterating gathers each FSDP2 shard with ``full_tensor()``, a
    collective: every trainer rank iterates, in the same order, as often as rank 0 does.
    ``wire_dtype`` (the server's dtype, e.g. bf16 on a GPU) casts each floating tensor on its
    way out, so the bytes sent are the bytes the server keeps; None sends the trainer's
    own. One tensor is materialised at a time: no second copy of the model is held."""

    def __init__(self, policy: nn.Module, wire_dtype: torch.dtype | None = None):
        self.policy = policy
        self.wire_dtype = wire_dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, wire_dtype_of(tensor, self.wire_dtype), tuple(tensor.shape))
                for name, tensor in checkpoint_entries(self.policy)]

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in checkpoint_entries(self.policy):
            yield name, materialise(tensor, self.wire_dtype)

    def total_bytes(self) -> int:
        """The bytes one pass sends."""
        return sum(meta.dtype.itemsize * math.prod(meta.shape) for meta in self.metadata())
