"""Rollout engines: where on-policy responses and greedy validation answers are generated.

One small interface (:class:`~lightning_unified.engines.base.RolloutEngine`): start, generate
from token ids, sync the policy's weights, score given tokens, sleep and wake. ``hf`` is the
training model's own ``generate`` (or a copy of it, when sampling ahead); ``vllm`` is a vLLM
engine colocated in the training process; ``server`` is vLLM servers apart from the trainer,
shared by its ranks. A new engine (SGLang, say) is one more class here and one more name in
:data:`ENGINES`.
"""

from __future__ import annotations

from lightning_unified.engines.base import GenerationRequest, Rollout, RolloutEngine
from lightning_unified.engines.hf import HFEngine
from lightning_unified.specs import ENGINES


def build_engine(name: str, options: dict | None = None, own_weights: bool = False, **sampling) -> RolloutEngine:
    """The engine ``sampling.engine`` names, not yet started. ``sampling`` is the run's
    temperature, top_k, top_p and behaviour (an engine may fix its log-prob mode from them).
    ``own_weights``: the engine must hold weights of its own, apart from the training
    model's (it samples while the trainer updates them)."""
    if name == "hf":
        return HFEngine(copy=own_weights)
    if name == "vllm":
        from lightning_unified.engines.vllm import VLLMEngine

        try:
            return VLLMEngine(**sampling, **(options or {}))
        except TypeError as error:
            raise ValueError(f"sampling.vllm: {error}") from error
    if name == "server":
        from lightning_unified.engines.served import ServedEngine

        try:
            return ServedEngine(**sampling, **(options or {}))
        except TypeError as error:
            raise ValueError(f"sampling.server: {error}") from error
    raise ValueError(f"sampling.engine must be one of {ENGINES}, got {name!r}")


__all__ = ["ENGINES", "GenerationRequest", "HFEngine", "Rollout", "RolloutEngine", "build_engine"]
