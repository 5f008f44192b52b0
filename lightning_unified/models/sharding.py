"""FSDP2 (``ModelParallelStrategy``): how the policy is cut into shard units, and what
Lightning's evaluation loops must do differently for a sharded policy."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from lightning_unified.models.forward import decoder
from lightning_unified.models.precision import fsdp_mixed_precision


def is_sharded(policy: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in policy.parameters())


def shard_policy(policy: nn.Module, mesh, precision: str | None = None) -> None:
    """Shard each decoder layer, the embeddings and the loss head as their own units
    (embeddings and head as one unit when they share their weight), then the root. Under
    the trainer's ``precision`` ``bf16-mixed`` each unit gathers its float32 shards as bf16
    and reduces gradients in float32 (:func:`~lightning_unified.models.precision.fsdp_mixed_precision`)."""
    from torch.distributed.fsdp import fully_shard

    layers, head_policy = fsdp_mixed_precision(precision)
    # the blocks Hugging Face never splits across devices (decoder layers) are the units
    blocks = set(getattr(policy, "_no_split_modules", None) or [])
    body = decoder(policy)
    for module in body.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, **_mp(layers))
    head = policy.get_output_embeddings()
    if head.weight is policy.get_input_embeddings().weight:
        # tied embeddings (SmolLM2, Gemma): one parameter, so one unit for both modules
        fully_shard([body, head], mesh=mesh, **_mp(head_policy))
    else:
        fully_shard(body, mesh=mesh, **_mp(layers))
        fully_shard(head, mesh=mesh, **_mp(head_policy))
    fully_shard(policy, mesh=mesh, **_mp(layers))


def _mp(policy) -> dict:
    return {} if policy is None else {"mp_policy": policy}


def initialise_root(policy: nn.Module, device: torch.device) -> None:
    """Run one token through the whole sharded policy, so FSDP2 takes it as the root. The
    loss calls the decoder directly (the head runs the loss inside its own forward): were a
    run's first forward a training step (a resumed run, or validate_first=false), the
    decoder would become the root, and the policy's next forward (validation's generate)
    would fail with "FSDP state has already been lazily initialized"."""
    was_training = policy.training
    policy.eval()  # no dropout: the forward draws nothing from the random stream
    try:
        with torch.no_grad():
            policy(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        policy.train(was_training)


def evaluate_without_inference_mode(trainer: L.Trainer) -> None:
    """Under ModelParallelStrategy (FSDP2), validate under no_grad, not inference_mode:
    FSDP2's unshard inside ``generate`` writes to parameters, and "Inference tensors do
    not track version counter" stops the run (on NCCL; Lightning already uses no_grad
    on gloo, and for FSDP1)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_unified.lightning_private import evaluate_without_inference_mode as without_inference_mode

    if not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    without_inference_mode(trainer)
