"""A scalar head on a causal LM's decoder: one number per sequence (a reward model's score;
next, a critic's value per token), and the head saved with its decoder as the
``AutoModelForSequenceClassification`` directory that Hugging Face and
:class:`lightning_unified.rewards.RewardModel` load.

The head reads the decoder that the policy's forward already uses
(:func:`lightning_unified.models.forward.decoder`), so LoRA, gradient checkpointing and
the policy's loading options apply unchanged; the causal LM's own output head is not used.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lightning_unified.models.forward import decoder
from lightning_unified.models.lora import is_lora, merged_copy


class ScalarHead(nn.Module):
    """``Linear(hidden, 1)`` without a bias, as the ``score`` layer of Hugging Face's
    sequence classifiers (so it saves as one), initialised as they are: normal with the
    model's ``initializer_range``, from ``seed`` (None: the global generator, which a run
    seeds)."""

    def __init__(self, hidden_size: int, initializer_range: float = 0.02, seed: int | None = None):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            nn.init.normal_(self.score.weight, std=initializer_range)

    def forward(self, hidden: Tensor) -> Tensor:
        """[..., H] -> [...]: float32 whatever the hidden states' dtype (scores are compared
        and summed, never fed back)."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


def scored_positions(input_ids: Tensor, attention_mask: Tensor, stop_token_ids: list[int]) -> Tensor:
    """[B] long: each sequence's last real token that is not a stop token (EOS, end of turn).

    This is the token Hugging Face's sequence classifiers pool when their pad token is the
    EOS (the rightmost non-pad token), and the last token :class:`RewardModel` sees of a
    decoded completion, which carries no EOS: so the score trained here is the score read
    there. A sequence of stop tokens only is scored at its last real token."""
    real = attention_mask.bool()
    stop = torch.zeros_like(real)
    for token in stop_token_ids:
        stop |= input_ids == token
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    content = real & ~stop
    last_content = (positions * content).argmax(-1)
    last_real = (positions * real).argmax(-1)
    return torch.where(content.any(-1), last_content, last_real)


def sequence_scores(model: nn.Module, head: ScalarHead, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor, stop_token_ids: list[int]) -> Tensor:
    """[B] float32: the head on the decoder's hidden state at each prompt + response's
    :func:`scored_positions`. Prompt (left-padded) and response (right-padded) are one
    sequence; position ids count real tokens only, so padding shifts nothing."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P + R]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state  # [B, P + R, H]
    at = scored_positions(input_ids, attention_mask, stop_token_ids)  # [B]
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), at])  # [B]


def as_sequence_classifier(model: nn.Module, head: ScalarHead, pad_token_id: int | None) -> PreTrainedModel:
    """A plain ``AutoModelForSequenceClassification`` (``num_labels=1``) holding ``model``'s
    decoder (its LoRA adapters merged in) and ``head`` as its score layer; ``model`` is left
    as it is."""
    plain = merged_copy(model) if is_lora(model) else model
    config = copy.deepcopy(plain.config)
    config.num_labels, config.architectures = 1, None
    config.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=next(plain.parameters()).dtype)
    body = classifier.base_model_prefix
    heads = [(name, m) for name, m in classifier.named_children() if name != body and isinstance(m, nn.Linear)]
    if len(heads) != 1 or heads[0][1].bias is not None:
        raise NotImplementedError(f"{type(classifier).__name__}: expected one bias-free linear score layer beside "
                                  f"{body!r}, found {[name for name, _ in heads]}; saving a reward model of this "
                                  f"architecture is not built")
    state = {f"{body}.{k}": v for k, v in decoder(plain).state_dict().items()}
    state[f"{heads[0][0]}.weight"] = head.score.weight.detach().to(next(iter(state.values())).dtype)
    classifier.load_state_dict(state, strict=True)
    return classifier.eval()
