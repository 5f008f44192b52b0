"""Which dtype each model's weights are kept in, and which the step computes in.

The policy's weights and its optimizer state are float32 (the master weights) whatever the
checkpoint's dtype; the trainer's precision (``bf16-mixed``) makes the compute bf16. This is
what verl (``model_dtype`` float32 for the actor), torchtune's mixed-precision recipes and
prime-rl default to. bf16 weights halve the memory of the weights and of AdamW's two
moments, but bf16 keeps 8 significant bits: an update smaller than about 1/256 of a weight
rounds back to the weight itself. AdamW's step is about ``lr`` per weight, so at RL's
learning rates (1e-6) and weights of typical size (|w| ~ 0.01-0.1, so |w| / 256 ~ 4e-5 to
4e-4) nearly every update is lost. Frozen models (teachers, references) take no update: they
stay in the checkpoint's dtype, and bf16 there only halves their memory.
"""

from __future__ import annotations

import torch
from torch import nn

# the policy's weights when ``model.dtype`` is null
MASTER_DTYPE = "float32"
HALF = (torch.bfloat16, torch.float16)

# Lightning's precision flags -> the dtype the step's matrix products run in
_COMPUTE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
            "16-true": torch.float16, "32-true": torch.float32, "32": torch.float32, "64-true": torch.float64}


def compute_dtype(precision: str | int | None) -> torch.dtype | None:
    """The dtype the trainer's precision ``precision`` computes in (None: unknown flag)."""
    return _COMPUTE.get(str(precision)) if precision is not None else None


def half_precision_master(policy: nn.Module, precision: str | None) -> str | None:
    """What is lost when the weights the optimizer updates are half precision, naming the
    setting that made them so; None when they are float32."""
    dtypes = {p.dtype for p in policy.parameters() if p.requires_grad}
    half = sorted(str(d).removeprefix("torch.") for d in dtypes if d in HALF)
    if not half:
        return None
    cause = ("trainer.precision=bf16-true converts the whole model" if str(precision).endswith("-true")
             else "model.dtype asked for them")
    return (f"the trained weights and the optimizer's state are {'/'.join(half)} ({cause}): each update smaller "
            f"than about 1/256 of a weight rounds back to the weight (an AdamW step at lr 1e-6 on a weight of 0.01 "
            f"is lost). Keep float32 master weights (model.dtype=null, trainer.precision=bf16-mixed computes in "
            f"bf16) unless memory forces this")


def fsdp_mixed_precision(precision: str | None):
    """FSDP2's policies under ``bf16-mixed``: each unit's float32 shards are gathered as bf16
    (half the all-gather's bytes, and the matrix products in bf16 without autocast's casts
    per call) and gradients are reduced in float32 (a bf16 sum over many ranks loses the
    small ones), as verl and torchtune set it. Returns (decoder units' policy, output head's
    policy), or (None, None) for other precisions. The head's policy leaves its inputs as
    they are: the loss reaches it as keyword inputs (token weights, advantages, behaviour
    and teacher log-probs), which FSDP would otherwise cast to bf16 with the hidden states."""
    if str(precision) != "bf16-mixed":
        return None, None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    layers = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    head = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return layers, head
