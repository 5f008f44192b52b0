"""LoRA adapters through ``peft`` (an optional extra: ``pip install -e ".[lora]"``).

Only the adapters train; the output head is left a plain linear map, so the chunked loss
keeps working, and a reference model for KL penalties is the same base model with its
adapters switched off (:func:`adapters_disabled`), not a second copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn


def _peft():
    try:
        import peft
    except ImportError as error:  # a clear message beats a bare ModuleNotFoundError
        raise ImportError('model.lora needs peft: pip install -e ".[lora]" (scripts/setup.sh installs it)') from error
    return peft


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = "all-linear",
) -> nn.Module:
    """``model`` wrapped with LoRA adapters of rank ``r`` on ``target_modules`` (a list of
    module names, or peft's ``"all-linear"``: every linear layer but the output head)."""
    if r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {r}")
    peft = _peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head_name is not None and not isinstance(targets, str) and head_name in targets:
        raise ValueError(f"model.lora.target_modules names the output head {head_name!r}; the chunked loss needs "
                         f"it to stay a plain linear map")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model, adapters off, for the duration (peft's ``disable_adapter``)."""
    with model.disable_adapter():
        yield


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the adapters merged into its weights; ``model`` is left as it is."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def merged_from_state(model: nn.Module, state_dict: dict) -> nn.Module:
    """A plain model with the adapters merged in, from ``state_dict``, the whole (gathered)
    state of the LoRA model ``model``, whose own parameters are shards (FSDP2), which
    cannot be copied (FSDP2 refuses a deepcopy) nor merged on one rank. The architecture is
    built anew on the CPU in the weights' dtype, with the same adapters, and the state
    loaded into it."""
    from transformers import AutoModelForCausalLM

    peft = _peft()
    dtype = next(iter(state_dict.values())).dtype
    base = AutoModelForCausalLM.from_config(model.get_base_model().config, dtype=dtype)
    (name, config), = model.peft_config.items()  # add_lora makes one adapter
    copy = peft.get_peft_model(base, config, adapter_name=name)
    copy.load_state_dict(state_dict)  # strict: every weight of the gathered state, no more
    return copy.merge_and_unload()
