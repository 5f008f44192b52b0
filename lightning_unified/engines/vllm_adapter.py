"""An in-process vLLM engine's LoRA adapter: when only the policy's adapters train, the
engine holds the base weights (loaded once) and takes the adapter at each sync through
vLLM's own LoRA loading, as a served engine does, never a merged copy of the model.

Each sync writes the adapter in peft's layout to a directory of its own and loads it under
a fresh id, dropping the previous one. A fresh directory per version matters: vLLM keys its
prefix cache's blocks by the adapter's name and path, so blocks computed under the old
adapter are never served for the new one."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from lightning_unified.engines import adapters

ADAPTER_NAME = "policy"


class AdapterSlot:
    """The adapter the engine samples and scores with (``request``, a vLLM ``LoRARequest``;
    None before the first load). ``root`` holds its files; ``dtype`` is the engine's."""

    def __init__(self, rank: int, root: str, dtype: str):
        self.rank, self.root, self.dtype = rank, Path(root), getattr(torch, dtype)
        self.request = None
        self._loads = 0

    @classmethod
    def for_policy(cls, policy: nn.Module, root: str, dtype: str) -> AdapterSlot | None:
        """A slot when only the policy's adapters train; None otherwise (the engine then takes
        the whole merged model at each sync)."""
        if not adapters.adapters_alone_train(policy):
            return None
        return cls(adapters.lora_rank(policy), root, dtype)

    def engine_kwargs(self) -> dict:
        """``vllm.LLM`` arguments that give the engine room for one adapter of this rank."""
        from lightning_unified.engines.transfer.server_args import LORA_RANKS

        fitting = [rank for rank in LORA_RANKS if rank >= self.rank]
        if not fitting:
            raise ValueError(f"model.lora.r={self.rank}: vLLM serves adapters of rank {LORA_RANKS[-1]} at most; "
                             f"use sampling.engine=hf")
        return dict(enable_lora=True, max_lora_rank=fitting[0], max_loras=1)

    def load(self, llm, policy: nn.Module) -> int:
        """The policy's current adapter into ``llm`` in place of the previous one (every rank
        calls this: FSDP2's gathers); returns its bytes."""
        from vllm.lora.request import LoRARequest

        self._loads += 1
        directory = self.root / f"adapter-{self._loads}"
        written = adapters.save_adapter(policy, adapters.adapter_tensors(policy, self.dtype), directory)
        previous, self.request = self.request, LoRARequest(ADAPTER_NAME, self._loads, str(directory))
        # the engine's LoRA slots are inference tensors when it started under Lightning's
        # inference-mode validation: only inference mode may write them in place
        with torch.inference_mode():
            if previous is not None:  # one slot (max_loras=1): the old adapter out first
                llm.llm_engine.remove_lora(previous.lora_int_id)
                shutil.rmtree(previous.lora_path, ignore_errors=True)
            llm.llm_engine.add_lora(self.request)  # now, so that a bad adapter fails the sync, not a rollout
        return written
