"""The policy's weights as vLLM reads them: a vLLM ``WeightSource`` under the Hugging Face
checkpoint names, each FSDP2 shard gathered only when its turn comes."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from lightning_unified.engines.parameter_copy import checkpoint_entries, materialise, wire_dtype_of


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
