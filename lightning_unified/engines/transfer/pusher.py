"""The trainer's side of the served engine's weights: :class:`WeightPusher` hands the policy's
weights to one or more vLLM servers through vLLM's weight-transfer API, one version at a
time, and says which server holds which version.

One transfer group per server: a push sends the bytes once per server, one server after
the other, so a dead or hung server breaks only its own group, and the others still take
the version. Every push is checked: the server's version before it must be the one this
pusher last set (else another trainer is pushing to it), and after it must be the one sent.
A server whose push failed is left paused, so its half-updated weights are never sampled,
and is reported as not updated (:class:`WeightPushError`); later pushes skip it."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from vllm.distributed.weight_transfer.base import WeightSource

from lightning_unified.engines import adapters
from lightning_unified.engines.transfer.client import ServerClient, ServerError
from lightning_unified.engines.transfer.model_check import describe
from lightning_unified.engines.transfer.server_args import server_flags
from lightning_unified.engines.transfer.servers import Server, check_server, open_engine, share
from lightning_unified.engines.transfer.source import PolicySource
from lightning_unified.models.lora import is_lora

log = logging.getLogger(__name__)

PAUSE_MODES = ("wait", "keep", "abort", None)


@dataclass
class PushStats:
    """One push. ``bytes``: what one server received (the whole model, or with LoRA the
    adapter's file); ``seconds``: the push's wall time, every server included;
    ``peak_extra_bytes``: the most the push allocates on the trainer besides the model (the
    transfer's buffers and the one tensor being gathered or cast), a bound by construction
    that a test measures against; ``servers``: each server's version after the push (None:
    it does not hold this pusher's weights); ``failures``: why each server this push failed
    on is not updated."""

    version: int | None
    kind: str  # "full", "adapter", or "base" (LoRA's base weights, once at start)
    bytes: int = 0
    seconds: float = 0.0
    peak_extra_bytes: int = 0
    servers: dict[str, str | None] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def updated(self) -> list[str]:
        return [url for url, held in self.servers.items() if held is not None and url not in self.failures]


class WeightPushError(RuntimeError):
    """A push failed on some servers; ``stats`` says which servers hold which version."""

    def __init__(self, stats: PushStats):
        held = ", ".join(f"{url} holds version {version}" for url, version in stats.servers.items()
                         if url not in stats.failures and version is not None) or "none"
        super().__init__(f"the push of version {stats.version} failed on {len(stats.failures)} server(s), which "
                         f"are not updated and out of use (paused where they still answer; never sample from "
                         f"them): " + "; ".join(stats.failures.values()) + f". In use: {held}")
        self.stats = stats


class WeightPusher:
    """``urls``: the servers' roots. ``backend``: ``auto`` takes the one each server was
    started with (``--weight-transfer-config``); ``lu_gloo``, ``lu_nccl`` or ``nccl`` must
    match it. ``bucket_mb`` bounds each transfer's buffer; ``timeout_s`` bounds each HTTP call,
    the group's handshake and each bucket. ``lora``: only the adapters move at each push,
    through vLLM's runtime LoRA loading (the base weights once, at :meth:`start`), written
    under ``adapter_dir`` (a directory every server can read: None is a temporary one on
    this machine); requests name the adapter ``adapter_name`` in their ``model`` field.
    ``master_address``: the trainer's address as the servers reach it (None: the loopback
    address for servers on it, else the address of the interface that routes to them)."""

    def __init__(self, urls: list[str], *, backend: str = "auto", bucket_mb: float = 256, timeout_s: float = 300.0,
                 lora: bool = False, adapter_name: str = "policy", adapter_dir: str | None = None,
                 master_address: str | None = None):
        if not urls:
            raise ValueError("WeightPusher needs at least one server URL")
        if backend not in ("auto", "lu_gloo", "lu_nccl", "nccl"):
            raise ValueError(f"backend must be auto, lu_gloo, lu_nccl or nccl, got {backend!r}")
        if bucket_mb <= 0 or timeout_s <= 0:
            raise ValueError(f"bucket_mb and timeout_s must be > 0, got {bucket_mb} and {timeout_s}")
        self.urls = [url.rstrip("/") for url in urls]
        self.backend, self.bucket_bytes, self.timeout_s = backend, int(bucket_mb * 2**20), timeout_s
        self.lora, self.adapter_name = lora, adapter_name
        self._adapter_root = adapter_dir
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._adapter_versions: list[Path] = []
        self.master_address = master_address
        self.rank, self.world_size = 0, 1
        self.servers: dict[str, Server] = {}

    # --- start -------------------------------------------------------------------------------
    def start(self, policy: nn.Module, rank: int = 0, world_size: int = 1) -> PushStats | None:
        """Check every server serves this model and open its transfer group (on rank 0; the
        other ranks only take part in the gathers). With LoRA, push the base weights now,
        on every rank, and return that push's stats."""
        self.rank, self.world_size = rank, world_size
        if self.lora:
            self._check_lora_policy(policy)
        error = None
        if rank == 0:
            try:
                self._open(policy)
            except Exception as raised:  # the other ranks are told, then it is raised here
                error = raised
        failure = share(None if error is None else f"{type(error).__name__}: {error}", world_size)
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"rank 0 could not start the weight pusher: {failure}")
        if self.lora:
            return self._push_full(policy, None, kind="base", pause=None)
        return None

    def _open(self, policy: nn.Module) -> None:
        from lightning_unified.engines.transfer.plugin import register

        register()
        metadata = PolicySource(policy).metadata()
        description = describe(policy, [(m.name, m.shape) for m in metadata])
        for url in self.urls:
            client = ServerClient(url, self.timeout_s)
            server = check_server(client, policy, self.backend, self.lora,
                                  adapters.lora_rank(policy) if self.lora else None)
            server.source = _TrackedSource(PolicySource(policy, server.wire_dtype))
            server.engine = open_engine(server, description, self._master_address(url), self.bucket_bytes,
                                        self.timeout_s)
            self.servers[url] = server

    def _check_lora_policy(self, policy: nn.Module) -> None:
        if not is_lora(policy):
            raise ValueError("WeightPusher(lora=True) moves a LoRA policy's adapters, but the policy has none "
                             "(model.lora.r > 0 makes one)")
        trainable = adapters.trainable_outside_adapters(policy)
        if trainable:
            raise ValueError(f"WeightPusher(lora=True) moves only the adapters, but the policy also trains "
                             f"{trainable[:3]}: push the whole model (lora=False)")

    def _master_address(self, url: str) -> str:
        if self.master_address is not None:
            return self.master_address
        host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
        if host in ("localhost", "::1") or host.startswith("127."):
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent
            probe.connect((host, 9))
            return probe.getsockname()[0]

    # --- push --------------------------------------------------------------------------------
    def push(self, policy: nn.Module, version: int, pause: str | None = "wait") -> PushStats:
        """Give every server still in use the policy's weights as ``version``; called on every
        trainer rank. ``pause``: how each server is paused around its update (vLLM's
        ``/pause`` modes: ``wait`` drains the requests in flight, ``keep`` freezes them and
        goes on with them after; None: the caller pauses and resumes). Raises
        :class:`WeightPushError` if any server failed; returns the stats otherwise."""
        if pause not in PAUSE_MODES:
            raise ValueError(f"pause must be one of {PAUSE_MODES}, got {pause!r}")
        _finish_device_work(policy)
        problem = None
        if self.rank == 0 and not self.servers:
            problem = "WeightPusher.push before start()"
        elif self.rank == 0 and all(s.failure is not None for s in self.servers.values()):
            problem = "no server takes weights any more, each failed earlier: " + "; ".join(
                s.failure for s in self.servers.values())
        problem = share(problem, self.world_size)  # every rank raises, or none
        if problem is not None:
            raise RuntimeError(problem)
        if self.lora:
            stats = self._push_adapter(policy, version, pause)
        else:
            stats = self._push_full(policy, version, kind="full", pause=pause)
        stats = share(stats, self.world_size)
        if stats.failures:
            raise WeightPushError(stats)
        return stats

    def _push_full(self, policy: nn.Module, version: int | None, kind: str, pause: str | None) -> PushStats:
        stats = PushStats(version, kind)
        targets = share([url for url, s in self.servers.items() if s.failure is None], self.world_size)
        began = time.perf_counter()
        with _merged(policy, merge=is_lora(policy) and not self.lora):
            for url in targets:
                if self.rank != 0:
                    for _ in PolicySource(policy):  # the gathers only
                        pass
                    continue
                server = self.servers[url]
                server.source.inner = PolicySource(policy, server.wire_dtype)
                stats.bytes = server.source.inner.total_bytes()
                with self._failing(server, stats):
                    self._transfer(server, version, pause)
                stats.peak_extra_bytes = max(stats.peak_extra_bytes, server.peak_extra_bytes(self.bucket_bytes))
        return self._finish(stats, began)

    def _transfer(self, server: Server, version: int | None, pause: str | None) -> None:
        client, sent = server.client, None if version is None else str(version)
        server.source.begin()
        try:
            server.check_version_unchanged()
            if pause is not None:
                client.pause(pause)
            self._update(server, sent, pause)
        finally:
            server.source.finish_pass()  # rank 0's gathers match the other ranks', even after a failure

    def _update(self, server: Server, sent: str | None, pause: str | None) -> None:
        client = server.client
        server.send(sent)
        server.check_version_sent(sent)
        # the prefix cache holds keys and values of the old weights: a prompt prefix the next
        # requests share would be served from it. With requests frozen in flight (keep) they
        # are recomputed from the new weights too
        if not client.call("POST", "/reset_prefix_cache" + ("?reset_running_requests=true" if pause == "keep" else ""))[
                "success"]:
            raise ServerError(client.url, f"{client.url} could not reset its prefix cache after the push (requests "
                                          f"still hold cached blocks: pause the server around a push)")
        if pause is not None:
            client.resume()

    def _push_adapter(self, policy: nn.Module, version: int, pause: str | None) -> PushStats:
        stats = PushStats(version, "adapter")
        targets = share([url for url, s in self.servers.items() if s.failure is None], self.world_size)
        began = time.perf_counter()
        dtypes = {self.servers[url].wire_dtype for url in targets} if self.rank == 0 else set()
        wire = share(dtypes.pop() if len(dtypes) == 1 else None, self.world_size)
        tensors = adapters.adapter_tensors(policy, wire)  # every rank: FSDP2's gathers
        if self.rank == 0 and targets:
            directory = self._adapter_directory(version)
            stats.bytes = adapters.save_adapter(policy, tensors, directory)
            stats.peak_extra_bytes = stats.bytes
            for url in targets:
                server = self.servers[url]
                with self._failing(server, stats):
                    server.check_version_unchanged()
                    if pause is not None:
                        server.client.pause(pause)
                    server.load_adapter(self.adapter_name, str(directory), str(version))
                    if pause == "keep":  # the frozen requests' keys and values are the old adapter's
                        server.client.call("POST", "/reset_prefix_cache?reset_running_requests=true")
                    if pause is not None:
                        server.client.resume()
            self._forget_old_adapters()
        del tensors
        return self._finish(stats, began)

    def _finish(self, stats: PushStats, began: float) -> PushStats:
        stats.seconds = time.perf_counter() - began
        stats.servers = {url: s.version if s.failure is None else None for url, s in self.servers.items()}
        if self.rank == 0:
            log.info("weights %s push (version %s): %.2f MB to each of %d server(s) in %.3f s%s", stats.kind,
                     stats.version, stats.bytes / 1e6, len(stats.updated), stats.seconds,
                     f"; failed on {sorted(stats.failures)}" if stats.failures else "")
        return stats

    @contextlib.contextmanager
    def _failing(self, server: Server, stats: PushStats):
        """A server's failure ends its part of the push, marks it not updated, and the push
        goes on with the others."""
        try:
            yield
        except Exception as error:
            why = str(error) if server.client.url in str(error) else f"{server.client.url}: {error}"
            server.fail(why)  # and paused, if it still answers
            stats.failures[server.client.url] = why
            log.error("weights push (version %s) failed on %s", stats.version, why)

    def _adapter_directory(self, version: int) -> Path:
        if self._adapter_root is None:
            self._temporary = self._temporary or tempfile.TemporaryDirectory(prefix="lightning_unified_adapters_")
            self._adapter_root = self._temporary.name
        directory = Path(self._adapter_root) / f"{self.adapter_name}-v{version}"
        self._adapter_versions.append(directory)
        return directory

    def _forget_old_adapters(self) -> None:
        # the latest two stay: vLLM reads an adapter's files when it loads it, and may again
        # if it drops it from its CPU cache
        while len(self._adapter_versions) > 2:
            shutil.rmtree(self._adapter_versions.pop(0), ignore_errors=True)

    def leave_out(self, url: str, why: str) -> None:
        """A server the sampling found dead or hung: later pushes skip it (not paused: one
        that hangs would hold the push for its timeout)."""
        server = self.servers.get(url.rstrip("/"))
        if server is not None and server.failure is None:
            server.failure = why
            if server.engine is not None:
                server.engine.shutdown()
                server.engine = None

    # --- state -------------------------------------------------------------------------------
    @property
    def versions(self) -> dict[str, str | None]:
        """Each server's version (None: not updated, out of use)."""
        return {url: s.version if s.failure is None else None for url, s in self.servers.items()}

    def close(self) -> None:
        """Close every transfer group (the servers keep running)."""
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    @staticmethod
    def server_flags(backend: str = "lu_gloo", lora_rank: int | None = None) -> tuple[list[str], dict[str, str]]:
        """The server's arguments and environment (:func:`~lightning_unified.engines.transfer.server_args.server_flags`)."""
        return server_flags(backend, lora_rank)


class _TrackedSource(WeightSource):
    """The pusher's source for one server's engine: the current policy's (set per push), and
    the pass an engine is iterating, so that rank 0 finishes it after a failure (its gathers
    are collectives: the other ranks wait for them)."""

    def __init__(self, inner: PolicySource):
        self.inner = inner
        self._live = None

    def metadata(self):
        return self.inner.metadata()

    def __iter__(self):
        self._live = iter(self.inner)
        return self._live

    def begin(self) -> None:
        self._live = None

    def finish_pass(self) -> None:
        """One whole pass since :meth:`begin`: the rest of the engine's, or all of one if the
        push failed before the engine began."""
        for _ in self._live if self._live is not None else self.inner:
            pass
        self._live = iter(())


def _finish_device_work(policy: nn.Module) -> None:
    """On a GPU, the optimizer step's kernels finished before the push reads the weights:
    vLLM's sender gathers and casts them on side streams of its own, which do not wait for
    the trainer's stream (a server could hold half-updated weights under the new version)."""
    parameter = next(policy.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        torch.cuda.current_stream(parameter.device).synchronize()


@contextlib.contextmanager
def _merged(policy: nn.Module, merge: bool):
    """A LoRA policy pushed whole: its adapters merged into the base for the duration."""
    if merge:
        policy.merge_adapter()
    try:
        yield
    finally:
        if merge:
            policy.unmerge_adapter()
