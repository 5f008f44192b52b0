"""The policy's weights as a vLLM engine loads them: under their Hugging Face checkpoint
names, LoRA adapters merged in, FSDP2 shards gathered; and the one reload notice vLLM logs
at every sync for a layer that holds no weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import Tensor, nn

from lightning_unified.models.lora import is_lora

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadNotice(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight sync.
    A rotary layer's only tensor is its cos/sin cache, a buffer computed from the config that
    no checkpoint holds; vLLM puts the computed one back, so nothing failed. Every other
    layer's failure still reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg == "%s: Failed to load weights" and len(args) == 1
                    and str(args[0]).endswith("RotaryEmbedding"))


def quiet_rotary_reload_notice() -> None:
    """Installs :class:`RotaryReloadNotice` on the logger of vLLM's weight reload, once."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadNotice) for f in logger.filters):
        logger.addFilter(RotaryReloadNotice())


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
