"""Policies and teachers: Hugging Face causal LMs, loaded from a local directory or built
from a config, and the one forward pass every stage shares."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """``from_pretrained`` on a local directory (the same path serves any real checkpoint)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face checkpoint at {path} (config.json is missing)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def build_policy(
    tokenizer: PreTrainedTokenizerBase,
    path: str | None = None,
    config: dict | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The policy to train: from ``path`` when given, else a fresh model built from
    ``config`` (``model_type`` plus its fields; vocabulary and special ids come from the
    tokenizer), initialised from ``seed``."""
    if path is not None:
        model = load_causal_lm(path)
    elif config is not None:
        config = dict(config)
        model_type = config.pop("model_type", "llama")
        hf_config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **config,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config)
    else:
        raise ValueError("model: give either path (a local Hugging Face directory) or config")
    check_vocabulary(model, tokenizer, "model")
    return model


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{what}: {type(model).__name__} has no output embeddings (lm_head); a causal LM is needed")
    if head.weight.shape[0] < len(tokenizer):
        raise ValueError(
            f"{what} has a vocabulary of {head.weight.shape[0]} tokens but the tokenizer has {len(tokenizer)}"
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{what} soft-caps its logits (final_logit_softcapping); the chunked loss needs a linear "
            f"head. weighted_nll_from_logits covers such heads but is not wired into the module yet"
        )


def output_head(model: PreTrainedModel) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output projection."""
    head: nn.Linear = model.get_output_embeddings()
    return head.weight, head.bias


def response_hidden(
    model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> Tensor:
    """Final hidden states [B, R, H] at the positions that predict each response token.

    Prompt (left-padded) and response (right-padded) are one sequence; position ids count
    real tokens only, so left padding does not shift them.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P + R]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    prompt_len, response_len = prompt_ids.shape[1], response_ids.shape[1]
    # position p predicts token p + 1: the last prompt token predicts the first response token
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len + response_len - 1]
