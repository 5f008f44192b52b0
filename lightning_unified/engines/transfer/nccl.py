"""``lu_nccl``: vLLM's own ``nccl`` weight transfer (its group, its packed double-buffered
broadcast, its layerwise reload), with one addition made before the group opens: the
server compares the trainer's description of its model with the one it serves and refuses
another model by name (:mod:`~lightning_unified.engines.transfer.model_check`). A server
started with plain ``nccl`` works too; the pusher then checks what HTTP shows (dtype, max
length) and vLLM's loader catches the rest at the first push, mid-way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
)

BACKEND = "lu_nccl"


@dataclass(kw_only=True)
class CheckedNCCLInitInfo(NCCLWeightTransferInitInfo):
    model: dict | None = field(default=None, repr=False)


class CheckedNCCLWeightTransferEngine(NCCLWeightTransferEngine):
    """The server's end: vLLM's NCCL engine, after the model check."""

    init_info_cls = CheckedNCCLInitInfo

    def init_transfer_engine(self, init_info: CheckedNCCLInitInfo) -> None:
        if init_info.model is not None:
            from lightning_unified.engines.transfer.model_check import describe_config, first_difference

            difference = first_difference(init_info.model, describe_config(self.model_config.hf_config))
            if difference is not None:
                raise ValueError(f"this server serves another model than the trainer's: {difference}")
        super().init_transfer_engine(init_info)


@dataclass
class CheckedNCCLTrainerInitInfo(NCCLTrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    model: dict | None = field(default=None, repr=False)


class _WithModel:
    """The client, with the trainer's model description added to the handshake vLLM's
    trainer engine builds (its worker init info has no field for it)."""

    def __init__(self, client, model: dict | None):
        self._client, self._model = client, model

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._client.init_weight_transfer_engine({**init_info, "model": self._model})

    def __getattr__(self, name):
        return getattr(self._client, name)


class CheckedNCCLTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """The trainer's end: vLLM's NCCL trainer engine, its handshake carrying the model."""

    init_info_cls = CheckedNCCLTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: CheckedNCCLTrainerInitInfo, *, client, source=None):
        return super().trainer_init(init_info, client=_WithModel(client, init_info.model), source=source)
