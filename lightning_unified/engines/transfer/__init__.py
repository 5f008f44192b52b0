"""The policy's weights pushed to vLLM servers through vLLM's weight-transfer API: the source
of the weights (:mod:`.source`), a CPU backend over gloo (:mod:`.gloo`) and the checked NCCL
one (:mod:`.nccl`), registered by this package's vLLM plugin (:mod:`.plugin`), the model
check of the handshake (:mod:`.model_check`), and the trainer-side
:class:`~.pusher.WeightPusher` that drives them (LoRA adapters: :mod:`..adapters`). Needs vLLM.

Nothing is imported until asked for: vLLM imports :mod:`.plugin` in every server process."""

from __future__ import annotations

import importlib

_EXPORTS = {"PushStats": "pusher", "WeightPushError": "pusher", "WeightPusher": "pusher",
            "server_command": "server_args", "server_flags": "server_args"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
