"""The policy's output layer, able to compute the one loss inside its own forward.

Sharded strategies (FSDP2's ``fully_shard``) gather a module's parameters only around that
module's forward and reduce their gradients from hooks on it. The chunked loss reads the
head's weight directly, so it must run inside the head's forward: this head is the
policy's own ``nn.Linear`` (same parameters, same state-dict keys) with a second mode.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_unified.objective import WeightedNLL, chunked_weighted_nll


class ChunkedLossHead(nn.Linear):
    def forward(self, hidden: Tensor, loss_inputs: dict | None = None) -> Tensor | WeightedNLL:
        """Logits, as a plain ``nn.Linear`` (generation); or, given ``loss_inputs`` (the
        keyword arguments of :func:`chunked_weighted_nll` after the head), the loss."""
        if loss_inputs is None:
            return super().forward(hidden)
        return chunked_weighted_nll(hidden, self.weight, head_bias=self.bias, **loss_inputs)


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
