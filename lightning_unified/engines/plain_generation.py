"""Generation from the run's settings alone, never from a checkpoint's own.

A Hugging Face checkpoint carries a ``generation_config`` (Qwen2.5-Instruct's says
repetition_penalty 1.05, temperature 0.7, top_p 0.8, top_k 20). Transformers' ``generate``
applies its penalties and bans to the scores before any logits processor of ours sees them,
and fills every setting a ``generation_config`` argument leaves unset from the model's own;
vLLM reads it for its stop tokens. An engine that let it in would sample from a distribution
its behaviour log-probs do not describe, and the importance ratio would correct the wrong
thing. So every engine samples from ``data_source.sampling`` alone, and the run says once
which of the checkpoint's settings it ignores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn
from transformers import GenerationConfig

from lightning_unified.engines.parameter_copy import base_model

log = logging.getLogger(__name__)

# what a generation_config holds that is no sampling setting: the ids and lengths every
# request gives itself (pad token, max_new_tokens; stop tokens are compared below), and
# bookkeeping
_NOT_SAMPLING = frozenset({
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash", "pad_token_id",
    "bos_token_id", "decoder_start_token_id", "eos_token_id", "max_length", "max_new_tokens", "use_cache",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
})

# (checkpoint, settings) already reported in this process
_SAID: set[tuple[str, str]] = set()


@contextlib.contextmanager
def checkpoint_settings_off(model: nn.Module) -> Iterator[None]:
    """``model.generate`` inside the block sees transformers' own defaults, not the
    checkpoint's: ``generate`` fills each setting that the ``generation_config`` it is given
    leaves unset (``suppress_tokens``, ``forced_bos_token_id``, ``sequence_bias``, ... have no
    neutral value but unset) from ``model.generation_config``, so a fresh config alone would
    not keep them out. The model's own is put back afterwards. Only the engine's thread
    generates with a given model, so the swap is never seen by another."""
    owner = base_model(model)  # under peft, the transformers model whose generate runs
    saved = getattr(owner, "generation_config", None)
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


def ignored_settings(config: GenerationConfig | None, stop_token_ids: tuple[int, ...]) -> dict:
    """The settings of a checkpoint's ``generation_config`` that would change what is sampled
    and that the run does not use: those away from transformers' defaults, and stop tokens
    the run's (``stop_token_ids``) do not include."""
    if config is None:
        return {}
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    out = {key: value for key, value in sorted(config.to_diff_dict().items())
           if key not in _NOT_SAMPLING and value is not None and not (key in defaults and defaults[key] == value)}
    eos = config.eos_token_id
    extra = sorted(({eos} if isinstance(eos, int) else set(eos or ())) - set(stop_token_ids))
    if extra:
        out["eos_token_id"] = extra
    return out


def say_ignored_once(policy: nn.Module, stop_token_ids: tuple[int, ...]) -> None:
    """Log, once per process and checkpoint, which of the policy's checkpoint generation
    settings the engines ignore."""
    model = base_model(policy)
    ignored = ignored_settings(getattr(model, "generation_config", None), stop_token_ids)
    if not ignored:
        return
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    text = ", ".join(f"{key}={value}" for key, value in ignored.items())
    if (name, text) in _SAID:
        return
    _SAID.add((name, text))
    log.warning("the checkpoint's generation_config (%s) sets %s; the rollout engine ignores them: it samples from "
                "the run's settings alone (data_source.sampling: temperature, top_k, top_p), which are the "
                "behaviour policy, stops at the run's stop tokens %s, and validation answers greedily",
                name, text, list(stop_token_ids))
