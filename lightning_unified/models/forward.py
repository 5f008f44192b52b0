"""The one forward pass every stage shares (the policy's, a teacher's, the reference's, a
ratio's or a margin's): the final hidden states at the positions that predict each
response token, padded or packed, and the output head that turns them into log-probs."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_unified.models.packing import Packing, batch_layout, unpack, uses_varlen_attention


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body under the LM head (``LlamaModel`` in ``LlamaForCausalLM``),
    through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def output_head(model: PreTrainedModel) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output projection."""
    head: nn.Linear = model.get_output_embeddings()
    return head.weight, head.bias


def response_hidden(
    model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
    packing: Packing | None = None,
) -> Tensor:
    """Final hidden states [B, R, H] at the positions that predict each response token.

    Prompt (left-padded) and response (right-padded) are one sequence; position ids count
    real tokens only, so left padding does not shift them. With ``packing`` enabled the
    batch's sequences go through the model end to end in packed rows
    (:mod:`lightning_unified.models.packing`) and come back in the same layout, 0 on
    response padding.
    """
    if packing is not None and packing.enabled:
        # the additive mask's dtype is the attention scores' (FlashAttention's varlen path needs none)
        mask_dtype = None if uses_varlen_attention(model) else attention_dtype(model, prompt_ids.device)
        packed = batch_layout(prompt_ids, prompt_mask, response_ids, response_mask, packing.max_tokens_per_row,
                              only_if_shorter=True)
        if packed is not None:
            inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
            if mask_dtype is not None:
                inputs["attention_mask"] = packed.attention_mask(mask_dtype)
            return unpack(decoder(model)(**inputs).last_hidden_state, packed)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P + R]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
    prompt_len, response_len = prompt_ids.shape[1], response_ids.shape[1]
    # position p predicts token p + 1: the last prompt token predicts the first response token
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len + response_len - 1]


def attention_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention scores have in ``model``'s forward: autocast's when it is on,
    else the parameters'. An additive mask must have it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype
