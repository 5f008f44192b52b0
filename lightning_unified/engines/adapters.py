"""A LoRA policy's adapters alone: what moves at each update when only the adapters train,
to a served engine and to the in-process ones alike (vLLM reads peft's own file layout; the
``hf`` engine's copy is a peft model of its own). The base weights move once, at start."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_unified.engines.parameter_copy import materialise
from lightning_unified.models.lora import is_lora

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_entries(policy: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name in peft's saved file, parameter or FSDP2 shard)`` for each adapter tensor of
    the policy's active adapter; nothing gathered. Embedding layers are not added (peft's
    ``"auto"`` would look the base model up on the Hub to decide)."""
    from peft import get_peft_model_state_dict

    adapter = _active_adapter(policy)
    return list(get_peft_model_state_dict(policy, state_dict=policy.state_dict(keep_vars=True),
                                          adapter_name=adapter, save_embedding_layers=False).items())


def adapter_tensors(policy: nn.Module, wire_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The adapter's tensors, whole (each FSDP2 shard gathered: every rank calls this, in step)
    and in ``wire_dtype``: a LoRA adapter is a small fraction of the model, held at once to be
    written as one file."""
    return {name: materialise(tensor, wire_dtype).contiguous() for name, tensor in adapter_entries(policy)}


def trainable_outside_adapters(policy: nn.Module) -> list[str]:
    """Trainable parameters that are not the adapter's (peft's ``modules_to_save``, a
    trainable head): with any, moving the adapters alone would leave the engine behind."""
    return [name for name, p in policy.named_parameters() if p.requires_grad and "lora_" not in name]


def adapters_alone_train(policy: nn.Module) -> bool:
    """True for a LoRA policy none of whose other weights train: an engine may then take
    its base once and only its adapters at each sync."""
    return is_lora(policy) and not trainable_outside_adapters(policy)


def adapter_parameters(policy: nn.Module) -> list[tuple[str, Tensor]]:
    """The adapter's tensors under the policy's own state-dict names (a peft copy of the
    policy has the same names), parameters or FSDP2 shards; nothing gathered."""
    return [(name, tensor) for name, tensor in policy.state_dict(keep_vars=True).items() if "lora_" in name]


def peft_copy(policy: nn.Module, model: nn.Module) -> nn.Module:
    """``model`` (a plain copy of the policy's base) with adapters of the policy's config, frozen."""
    import copy

    from peft import get_peft_model

    adapter = _active_adapter(policy)
    wrapped = get_peft_model(model, copy.deepcopy(policy.peft_config[adapter]), adapter_name=adapter)
    wrapped.requires_grad_(False)
    return wrapped.eval()


def lora_rank(policy: nn.Module) -> int:
    config = policy.peft_config[_active_adapter(policy)]
    ranks = [config.r, *getattr(config, "rank_pattern", {}).values()]
    return int(max(ranks))


def save_adapter(policy: nn.Module, tensors: dict[str, Tensor], directory: str | Path) -> int:
    """Write ``tensors`` and the adapter's config as peft saves them to ``directory``;
    returns the bytes of the tensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.cpu() for name, t in tensors.items()}, str(directory / WEIGHTS_FILE))
    config = policy.peft_config[_active_adapter(policy)].to_dict()
    # JSON has no sets (target_modules may be one); a base model path the reader cannot see is harmless
    (directory / CONFIG_FILE).write_text(json.dumps(config, default=_jsonable, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _active_adapter(policy: nn.Module) -> str:
    adapter = getattr(policy, "active_adapter", "default")
    return adapter if isinstance(adapter, str) else adapter[0]


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
