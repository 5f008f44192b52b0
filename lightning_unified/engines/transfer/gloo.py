"""``lu_gloo``: a weight-transfer backend for vLLM over a gloo process group, for servers and
trainers without a GPU (vLLM's ``nccl`` backend cannot start there: "Cannot access
accelerator device"). It goes through the same HTTP routes as ``nccl``
(``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``), so CPU tests exercise the served path a GPU run takes.

The group is a standalone one (a TCP store the trainer hosts, a prefix of its own), never
the default process group of either side: the trainer's DDP/FSDP group and the server's
own groups are left alone. Rank 0 is the trainer; the server's workers follow it. Weights
travel in buckets: each bucket is one broadcast of a flat byte buffer, cut at the same
places on both ends from the metadata the trainer sends first; the server loads each
bucket through vLLM's layerwise reload, as the ``nccl`` engine does."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from lightning_unified.engines.transfer.buckets import as_bytes, bucket_plan, tensor_bytes, unpack

BACKEND = "lu_gloo"
DEFAULT_BUCKET_BYTES = 256 * 2**20


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float, store=None):
    """A gloo process group of its own over the TCP store at ``address:port`` (hosted by rank
    0, which passes it as ``store``), bound to the loopback device when the address is
    loopback (else gloo's default device: ``GLOO_SOCKET_IFNAME`` picks the interface)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = torch.distributed.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    options = torch.distributed.ProcessGroupGloo._Options()
    options._timeout = timeout
    loopback = address in ("localhost", "::1") or address.startswith("127.")
    gloo = torch.distributed.ProcessGroupGloo
    options._devices = [gloo.create_device(hostname=address) if loopback else gloo.create_default_device()]
    prefixed = torch.distributed.PrefixStore(f"{BACKEND}/", store)
    return gloo(prefixed, rank, world_size, options)


# --- the server's side ------------------------------------------------------------------------
@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    """What a server's worker needs to join the trainer's group; ``model`` is the trainer's
    description of its model (:mod:`~lightning_unified.engines.transfer.model_check`),
    compared with the served one before the group opens."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0
    model: dict | None = field(default=None, repr=False)


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One push's tensors, in the order they are sent."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update_info has {len(self.names)} names, {len(self.dtype_names)} dtype_names and "
                             f"{len(self.shapes)} shapes: one of each per tensor")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The server's end: joins the trainer's gloo group and loads each bucket as it lands.
    A fresh receive buffer per bucket: the layerwise reload keeps the tensors of a layer
    until the layer is whole, and they are views of the buffer they arrived in."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.timeout_s = 300.0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        if init_info.model is not None:
            from lightning_unified.engines.transfer.model_check import describe_config, first_difference

            difference = first_difference(init_info.model, describe_config(self.model_config.hf_config))
            if difference is not None:
                raise ValueError(f"this server serves another model than the trainer's: {difference}")
        parallel = self.parallel_config
        rank = init_info.rank_offset + parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.bucket_bytes, self.timeout_s = init_info.bucket_bytes, init_info.timeout_s
        self.group = open_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which raises without an
        # accelerator; gloo's broadcast has returned with the bytes in host memory
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError(f"{BACKEND}: no transfer group; call /init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        sizes = [tensor_bytes(shape, dtype) for shape, dtype in zip(update_info.shapes, dtypes)]
        with disable_mtp_completeness_check():
            for bucket in bucket_plan(sizes, self.bucket_bytes):
                buffer = torch.empty(sum(sizes[i] for i in bucket), dtype=torch.uint8)
                self.group.broadcast(buffer, 0).wait(datetime.timedelta(seconds=self.timeout_s))
                self.model.load_weights(list(unpack(buffer, [update_info.names[i] for i in bucket],
                                                    [update_info.shapes[i] for i in bucket],
                                                    [dtypes[i] for i in bucket])))

    def shutdown(self) -> None:
        self.group = None


# --- the trainer's side -----------------------------------------------------------------------
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """``master_address`` is the trainer's address as the server reaches it; ``master_port``
    0 takes a free one. ``world_size`` is 1 (the trainer) plus the server's workers."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int = 0
    world_size: int = 2
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0
    model: dict | None = field(default=None, repr=False)


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's end. Every trainer rank calls :meth:`send_weights` (each iterates the
    source: FSDP2's gathers are collectives); only rank 0 holds the group and talks to the
    server. A failed transfer still iterates the rest of the source on rank 0, so the other
    ranks' gathers are matched and only this push fails, not the training job."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool = True,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 300.0) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group = None
        self._store = None
        #: the largest buffer a push allocated, in bytes (the trainer's extra memory, besides
        #: the one tensor being gathered or cast)
        self.buffer_bytes = 0

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError(f"{BACKEND}: the trainer's engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s)
        if engine.is_sender:
            engine._open(init_info)
        return engine

    def _open(self, info: GlooTrainerInitInfo) -> None:
        timeout = datetime.timedelta(seconds=info.timeout_s)
        self._store = torch.distributed.TCPStore(info.master_address, info.master_port, info.world_size,
                                                 is_master=True, timeout=timeout, wait_for_workers=False)
        worker = asdict(info) | {"master_port": self._store.port, "rank_offset": 1}
        worker.pop("rank")
        # the server joins inside its /init_weight_transfer_engine call while the trainer joins
        # here: both block until the other arrives. The call runs beside; a server that
        # refuses (another model, a bad setting) answers at once, and its error is raised
        # without waiting out the group's timeout
        joined = _Background(open_group, info.master_address, self._store.port, 0, info.world_size,
                             info.timeout_s, self._store)
        answered = _Background(self.client.init_weight_transfer_engine, worker)
        answered.wait(info.timeout_s, stop_early=joined)
        answered.raise_if_failed()  # the server's refusal, at once
        self.group = joined.wait(info.timeout_s).result()
        answered.wait(info.timeout_s).result()

    def send_weights(self, weight_version: str | None = None) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the gathers only
                pass
            return
        update = {"names": [m.name for m in meta], "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
                  "shapes": [list(m.shape) for m in meta]}
        self.client.start_weight_update()
        receiving = _Background(self.client.update_weights, update)
        pairs = iter(self.source)
        try:
            self._broadcast(pairs, meta, receiving)
        except BaseException:
            for _ in pairs:  # the other ranks' gathers still need this rank's
                pass
            raise
        receiving.wait(self.timeout_s).result()
        self.client.finish_weight_update(weight_version)

    def _broadcast(self, pairs: Iterator, meta: list[ParamMeta], receiving: _Background) -> None:
        sizes = [tensor_bytes(m.shape, m.dtype) for m in meta]
        plan = bucket_plan(sizes, self.bucket_bytes)
        # one buffer for the whole push: each broadcast has returned before the next bucket is packed
        self.buffer_bytes = max((sum(sizes[i] for i in bucket) for bucket in plan), default=0)
        buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        for bucket in plan:
            offset = 0
            for index in bucket:
                name, tensor = next(pairs)
                expected = meta[index]
                if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
                    raise ValueError(f"{BACKEND}: the source yielded {name!r} {tensor.dtype} {tuple(tensor.shape)} "
                                     f"where its metadata declared {expected.name!r} {expected.dtype} "
                                     f"{expected.shape}")
                data = as_bytes(tensor)
                buffer[offset:offset + data.numel()].copy_(data)
                offset += data.numel()
                del tensor, data
            receiving.raise_if_failed()  # a server that gave up is not waited for
            self.group.broadcast(buffer[:offset], 0).wait(timeout)
        if next(pairs, None) is not None:
            raise ValueError(f"{BACKEND}: the source yielded more tensors than its metadata declared ({len(meta)})")

    def shutdown(self) -> None:
        self.group = None
        self._store = None


class _Background:
    """A call in a daemon thread: a server that never answers cannot keep the trainer's
    process from exiting (a pool's worker thread would be joined at exit)."""

    def __init__(self, function, *args) -> None:
        self._value, self._error, self._waited_s = None, None, 0.0
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(function, args), daemon=True).start()

    def _run(self, function, args) -> None:
        try:
            self._value = function(*args)
        except BaseException as error:  # handed to the caller
            self._error = error
        finally:
            self._done.set()

    def wait(self, timeout_s: float, stop_early: _Background | None = None) -> _Background:
        """Until done, ``timeout_s`` at most; with ``stop_early``, also until that one fails."""
        end = time.monotonic() + timeout_s
        while not self._done.wait(0.05):
            if (stop_early is not None and stop_early.failed()) or time.monotonic() >= end:
                break
        self._waited_s = timeout_s
        return self

    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    def raise_if_failed(self) -> None:
        if self.failed():
            raise self._error

    def result(self):
        if not self._done.is_set():
            raise TimeoutError(f"no answer in {self._waited_s:.0f} s")
        if self._error is not None:
            raise self._error
        return self._value
