"""The policy's parameters copied to an engine that holds weights of its own (vLLM, or the
``hf`` engine's copy when it samples ahead): under their Hugging Face checkpoint names,
LoRA adapters merged in, FSDP2 shards gathered."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from lightning_unified.models.lora import is_lora


def base_model(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if is_lora(policy) else policy


def architecture(model: nn.Module) -> str:
    """The model's transformers class name (``LlamaForCausalLM``), also under FSDP2, which
    wraps the instance in a class of its own (``FSDPLlamaForCausalLM``)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


@contextlib.contextmanager
def engine_weights(policy: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """The policy's weights under their Hugging Face checkpoint names, as the engine loads
    them: LoRA adapters merged in for the duration, sharded (FSDP2) tensors gathered (a
    collective: every rank syncs at the same step)."""
    lora = is_lora(policy)
    if lora:
        policy.merge_adapter()
    try:
        weights = []
        for name, tensor in policy.state_dict().items():
            if lora:
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            weights.append((name, tensor.detach()))
        yield weights
    finally:
        if lora:
            policy.unmerge_adapter()
