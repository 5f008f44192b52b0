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
def engine_weights(policy: nn.Module, merge: bool = True) -> Iterator[Iterator[tuple[str, Tensor]]]:
    """The policy's weights under their Hugging Face checkpoint names, one at a time as the
    engine loads them: LoRA adapters merged in for the duration (``merge=False``: the base
    weights alone, for an engine that takes the adapters apart), each sharded (FSDP2) tensor
    gathered only when its turn comes (a collective: every rank syncs at the same step and
    reads every tensor in the same order), so no second whole copy of the model is held."""
    lora = is_lora(policy)
    merge = lora and merge
    if merge:
        policy.merge_adapter()
    try:
        # the state dict's entries are the parameters themselves (or their shards): taken
        # here, outside the engine's inference mode, which could not make them
        yield _one_at_a_time(policy.state_dict(), lora)
    finally:
        if merge:
            policy.unmerge_adapter()


def _one_at_a_time(state: dict[str, Tensor], lora: bool) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in state.items():
        if lora and "lora_" in name:
            continue
        yield checkpoint_name(name, lora), materialise(tensor)


def checkpoint_name(name: str, lora: bool) -> str:
    """A policy's state-dict name as the Hugging Face checkpoint calls it: under LoRA, peft's
    ``base_model.model.`` prefix and the adapted layers' ``.base_layer.`` dropped."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".") if lora else name


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


def materialise(tensor: Tensor, wire_dtype: torch.dtype | None = None) -> Tensor:
    """The whole tensor, gathered if sharded (a collective), detached, in its wire dtype."""
    if hasattr(tensor, "full_tensor"):
        with torch.inference_mode(False):  # a gathered DTensor is no inference tensor
            tensor = tensor.full_tensor()
    return tensor.detach().to(wire_dtype_of(tensor, wire_dtype))
