"""The policy's output layer, able to compute the one loss inside its own forward.

Sharded strategies (FSDP2's ``fully_shard``) gather a module's parameters only around that
module's forward and reduce their gradients from hooks on it. The chunked loss reads the
head's weight directly, so it must run inside the head's forward: this head is the
policy's own ``nn.Linear`` (same parameters, same state-dict keys) with a second mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_unified.models.forward import response_hidden
from lightning_unified.models.packing import Packing
from lightning_unified.losses.objective import (
    WeightedNLL,
    chunked_weighted_nll,
    target_logprobs,
)


class ChunkedLossHead(nn.Linear):
    def forward(
        self, hidden: Tensor, loss_inputs: dict | None = None, target_ids: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor | WeightedNLL:
        """Logits, as a plain ``nn.Linear`` (generation); or, given ``loss_inputs`` (the
        keyword arguments of :func:`chunked_weighted_nll` after the head), the loss; or,
        given ``target_ids``, their log-probs without a gradient (:func:`target_logprobs`)."""
        if loss_inputs is not None:
            return chunked_weighted_nll(hidden, self.weight, head_bias=self.bias, **loss_inputs)
        if target_ids is not None:
            return target_logprobs(hidden, self.weight, target_ids, head_bias=self.bias, temperature=temperature)
        return super().forward(hidden)


def install_loss_head(model: nn.Module) -> ChunkedLossHead:
    """Turn ``model``'s output layer into a :class:`ChunkedLossHead` in place and return it.

    The instance's class is swapped rather than the module replaced, so parameters, tied
    weights and any hooks stay exactly as they were."""
    head = model.get_output_embeddings()
    if isinstance(head, ChunkedLossHead):
        return head
    if type(head) is not nn.Linear:
        raise TypeError(f"the policy's output layer is a {type(head).__name__}; the chunked loss needs an nn.Linear")
    head.__class__ = ChunkedLossHead
    return head


@torch.no_grad()
def response_logprobs(policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, temperature: float = 1.0, packing: Packing | None = None) -> Tensor:
    """log pi(y_t) [B, R] of the responses under ``policy`` as it is now, 0 on padding: one
    no-grad forward, through the head's own forward so a sharded (FSDP2) head is gathered."""
    hidden = response_hidden(policy, prompt_ids, prompt_mask, response_ids, response_mask, packing)
    logp = policy.get_output_embeddings()(hidden, target_ids=response_ids, temperature=temperature)
    return torch.where(response_mask.bool(), logp, 0.0)
