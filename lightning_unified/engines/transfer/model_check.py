"""Is the served model the policy's model? Both ends describe their model the same way (its
architecture, the config values that shape its weights, and every checkpoint weight's
name and shape) and the first difference is named. The trainer sends its description in
the weight-transfer handshake; the server's engine compares it with the model it serves
before any byte moves, so a server of another model is refused at start, not half
overwritten at the first push."""

from __future__ import annotations

import json

import torch
from torch import nn

from lightning_unified.engines.parameter_copy import architecture, base_model

# config values that change the weights' meaning without changing their shapes (or shapes
# vLLM pads), compared when both ends state them
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "hidden_act",
               "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling")


def describe(model: nn.Module, parameters: list[tuple[str, tuple[int, ...]]]) -> dict:
    """The trainer's description: ``parameters`` are the ``(name, shape)`` a push sends."""
    plain = base_model(model)
    return {"architecture": architecture(plain), "config": _config_values(plain.config.to_dict()),
            "parameters": [[name, list(shape)] for name, shape in parameters]}


def describe_config(hf_config) -> dict:
    """The server's description, from the config it serves: the checkpoint weights of a
    Hugging Face model built from it on the meta device (no memory), or none where
    transformers cannot build it (an architecture only vLLM knows): then the config values
    alone are compared."""
    from transformers import AutoModelForCausalLM

    from lightning_unified.engines.parameter_copy import checkpoint_entries

    architectures = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
    description = {"architecture": architectures[0], "config": _config_values(hf_config.to_dict()), "parameters": None}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # the config values still say whether it is the policy's model
        return description
    description["parameters"] = [[name, list(tensor.shape)] for name, tensor in checkpoint_entries(model)]
    return description


def first_difference(ours: dict, theirs: dict) -> str | None:
    """The first way the served model (``theirs``) differs from the policy's (``ours``), in
    words; None when they agree."""
    if ours["architecture"] != theirs["architecture"]:
        return f"its architecture is {theirs['architecture']}, the policy's {ours['architecture']}"
    for key in CONFIG_KEYS:
        if key in ours["config"] and key in theirs["config"] and ours["config"][key] != theirs["config"][key]:
            return f"its config's {key} is {theirs['config'][key]!r}, the policy's {ours['config'][key]!r}"
    if theirs["parameters"] is None:
        return None
    served = {name: shape for name, shape in theirs["parameters"]}
    sent = {name: shape for name, shape in ours["parameters"]}
    for name, shape in ours["parameters"]:
        if name not in served:
            return f"it has no weight {name!r}, which the policy sends"
        if served[name] != shape:
            return f"its weight {name!r} has shape {served[name]}, the policy's {shape}"
    missing = [name for name, _ in theirs["parameters"] if name not in sent]
    if missing:
        return f"it has weights the policy does not send: {missing[:3]}"
    return None


def _config_values(config: dict) -> dict:
    # through JSON, so both ends compare the same plain values (tuples become lists)
    return json.loads(json.dumps({key: config[key] for key in CONFIG_KEYS if config.get(key) is not None},
                                 default=str))
