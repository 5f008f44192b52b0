"""One server as the pusher sees it: what it serves (checked at start against the policy), its
transfer engine, the version it holds, and whether it is still in use. Every error names
the server's URL."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import torch
from torch import nn

from lightning_unified.engines.parameter_copy import base_model
from lightning_unified.engines.transfer.client import ServerClient, ServerError
from lightning_unified.engines.transfer.server_args import server_flags


@dataclass
class Server:
    client: ServerClient
    backend: str
    wire_dtype: torch.dtype
    workers: int  # the server's worker processes (tensor x pipeline x data parallel)
    max_model_len: int | None
    version: str | None  # what it reported at start, then what this pusher set
    engine: object = None
    source: object = None
    failure: str | None = None

    @property
    def url(self) -> str:
        return self.client.url

    def check_version_unchanged(self) -> None:
        reported = self.client.weight_version()
        if reported != self.version:
            raise ServerError(self.url, f"{self.url} reports weight version {reported!r}, but this pusher last set "
                                        f"{self.version!r}: another trainer is pushing to it, or it restarted")

    def send(self, version: str | None) -> None:
        """The transfer itself, then the version (vLLM's NCCL engine finishes without one)."""
        if self.backend == "lu_gloo":
            self.engine.send_weights(version)
        else:
            self.engine.send_weights()
            if version is not None:
                self.client.set_weight_version(version)

    def check_version_sent(self, sent: str | None) -> None:
        expected = self.version if sent is None else sent
        reported = self.client.weight_version()
        if reported != expected:
            raise ServerError(self.url, f"{self.url} reports weight version {reported!r} after a push of version "
                                        f"{expected!r}")
        self.version = reported

    def load_adapter(self, name: str, directory: str, version: str) -> None:
        """The adapter in ``directory`` under ``name``, replacing the one loaded before. The
        prefix cache needs no reset: vLLM keys cached blocks by the adapter's path too, and
        each version has a directory of its own."""
        self.client.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": directory,
                                                           "load_inplace": True})
        self.client.set_weight_version(version)
        self.check_version_sent(version)

    def peak_extra_bytes(self, bucket_bytes: int) -> int:
        """The trainer's extra memory in a push, by construction: lu_gloo packs into one
        buffer (at most a bucket, or the largest tensor) while one tensor is gathered or cast;
        vLLM's NCCL packer holds two buffers in flight, each built from a bucket's tensors."""
        largest = max((m.dtype.itemsize * math.prod(m.shape) for m in self.source.metadata()), default=0)
        if self.backend == "lu_gloo":
            return getattr(self.engine, "buffer_bytes", 0) + largest
        return 2 * 2 * (bucket_bytes + largest)

    def fail(self, why: str) -> None:
        """Out of use: its group is dropped (the server's side of it may be gone), and a
        server that still answers is paused, its requests aborted, so that weights of no
        known version are never sampled."""
        self.failure = why
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        try:
            ServerClient(self.url, min(self.client.timeout_s, 5.0)).pause("abort")
        except ServerError:
            pass  # a dead or hung server samples nothing either

    def close(self) -> None:
        if self.engine is None:
            return
        self.engine.shutdown()
        self.engine = None
        try:  # frees the server's side, so another trainer may connect
            self.client.shutdown_weight_transfer_engine()
        except ServerError:
            pass  # a server that is gone has nothing to free


def check_server(client: ServerClient, policy: nn.Module, backend: str, lora: bool,
                 lora_rank: int | None) -> Server:
    """What ``client``'s server serves, refused where it cannot take this policy's weights:
    a longer context than the policy's, no or another weight-transfer backend, no room for
    its adapter. (Its architecture and weights' shapes are compared in the handshake.)"""
    url = client.url
    models = client.models()
    if not models:
        raise ServerError(url, f"{url} serves no model (GET /v1/models is empty)")
    max_model_len = models[0].get("max_model_len")
    longest = getattr(base_model(policy).config, "max_position_embeddings", None)
    if max_model_len is not None and longest is not None and max_model_len > longest:
        raise ValueError(f"{url} serves max_model_len={max_model_len}, beyond the policy's max_position_embeddings="
                         f"{longest}: it serves another model (or start it with --max-model-len {longest})")
    config = client.server_info()["vllm_config"]
    served = (config.get("weight_transfer_config") or {}).get("backend")
    flags, env = server_flags("lu_gloo" if backend == "auto" else backend, lora_rank)
    start_with = f"start it with {' '.join(flags)} and {' '.join(f'{k}={v}' for k, v in env.items())}"
    if served is None:
        raise ValueError(f"{url} takes no weights: it has no weight-transfer backend ({start_with})")
    if backend != "auto" and served != backend:
        raise ValueError(f"{url} was started with the weight-transfer backend {served!r}, the pusher's is {backend!r}")
    if lora:
        lora_config = config.get("lora_config")
        if not lora_config:
            raise ValueError(f"{url} does not serve LoRA adapters ({start_with})")
        if lora_config["max_lora_rank"] < lora_rank:
            raise ValueError(f"{url} serves adapters of rank {lora_config['max_lora_rank']} at most, the policy's is "
                             f"{lora_rank} ({start_with})")
    dtype = getattr(torch, str(config["model_config"]["dtype"]).removeprefix("torch."))
    workers = int(client.call("GET", "/get_world_size")["world_size"])
    return Server(client, served, dtype, workers, max_model_len, client.weight_version())


def open_engine(server: Server, description: dict, master_address: str, bucket_bytes: int, timeout_s: float):
    """The trainer's end of ``server``'s transfer group, after the server has compared
    ``description`` with the model it serves (``lu_*`` backends)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    world = 1 + server.workers
    if server.backend == "lu_gloo":
        from lightning_unified.engines.transfer.gloo import GlooTrainerInitInfo

        info = GlooTrainerInitInfo(master_address=master_address, world_size=world, bucket_bytes=bucket_bytes,
                                   timeout_s=timeout_s, model=description, rank=0)
    else:
        from lightning_unified.engines.transfer.nccl import CheckedNCCLTrainerInitInfo, NCCLTrainerInitInfo

        nccl = dict(master_address=master_address, master_port=_free_port(master_address), world_size=world,
                    packed=True, packed_buffer_size_bytes=bucket_bytes, packed_num_buffers=2, rank=0)
        info = (CheckedNCCLTrainerInitInfo(**nccl, model=description) if server.backend == "lu_nccl"
                else NCCLTrainerInitInfo(**nccl))
    try:
        return WeightTransferTrainerFactory.trainer_init(info, client=server.client, source=server.source)
    except ServerError as error:
        marker = "serves another model than the trainer's: "
        if marker in str(error):
            difference = str(error).split(marker, 1)[1]
            raise ValueError(f"{server.url} serves another model than the policy: {difference}") from None
        raise


def share(value, world_size: int):
    """Rank 0's ``value`` on every trainer rank (each decides the same, and iterates the
    same number of passes: FSDP2's gathers are collectives)."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
