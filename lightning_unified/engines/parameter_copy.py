"""The policy's parameters copied to an engine that holds weights of its own (vLLM, or the
``hf`` engine's copy when it samples ahead): under their Hugging Face checkpoint names,
LoRA adapters merged in, FSDP2 shards gathered."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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
def engine_weights(policy: nn.Module) -> Iterator[Iterator[tuple[str, Tensor]]]:
    """The policy's weights under their Hugging Face checkpoint names, one at a time as the
    engine loads them: LoRA adapters merged in for the duration, each sharded (FSDP2) tensor
    gathered only when its turn comes (a collective: every rank syncs at the same step and
    reads every tensor in the same order), so no second whole copy of the model is held."""
    lora = is_lora(policy)
    if lora:
        policy.merge_adapter()
    try:
        # the state dict's entries are the parameters themselves (or their shards): taken
        # here, outside the engine's inference mode, which could not make them
        yield _one_at_a_time(policy.state_dict(), lora)
    finally:
        if lora:
            policy.unmerge_adapter()


def _one_at_a_time(state: dict[str, Tensor], lora: bool) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in state.items():
        if lora:
            if "lora_" in name:
                continue
            name = checkpoint_name(name, lora)
        if hasattr(tensor, "full_tensor"):
            with torch.inference_mode(False):  # a gathered DTensor is no inference tensor
                tensor = tensor.full_tensor()
        yield name, tensor.detach()


def checkpoint_name(name: str, lora: bool) -> str:
    """A policy's state-dict name as the Hugging Face checkpoint calls it: under LoRA, peft's
    ``base_model.model.`` prefix and the adapted layers' ``.base_layer.`` dropped."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".") if lora else name
