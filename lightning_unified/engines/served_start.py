"""The served engine's rounds with the fleet that every trainer rank shares: starting it
(rank 0 launches the servers when the run starts them, every rank learns their URLs and
checks what they serve) and pushing a version (rank 0 drives the transfer, every rank joins
its gathers, then learns which servers hold the version). Collectives here run in the
trainer's thread, at the same step on every rank (the rollout owner's sync schedule)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_unified.engines.parameter_copy import base_model
from lightning_unified.engines.server_fleet import ServerFleet, serve_env
from lightning_unified.engines.server_requests import ServerError

log = logging.getLogger(__name__)


@dataclass
class PushRecord:
    """What the latest push moved, for the run's log."""

    version: int
    bytes: int = 0
    seconds: float = 0.0
    servers: list[str] = field(default_factory=list)


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_rank_zero(value):
    """``value`` as rank 0 has it, on every rank."""
    rank, world = _rank()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _model_dir(engine, policy: nn.Module) -> str:
    """A directory of the policy's architecture for launched servers to start from: the
    checkpoint it was loaded from, else its config and weights written into the run
    directory (the first push gives the servers the policy's own weights either way)."""
    model = base_model(policy)
    source = getattr(model.config, "_name_or_path", "")
    if source and (Path(source) / "config.json").is_file():
        return source
    target = Path(engine.run_dir or ".") / "servers" / "model"
    model.save_pretrained(target)
    return str(target)


def start_servers(engine, policy: nn.Module) -> tuple[list[str], ServerFleet | None, object]:
    """(the servers' URLs, the fleet this run launched or None, the weight pusher), the same
    on every rank; the servers checked to serve the policy's model (the pusher's start)."""
    from lightning_unified.engines.transfer import WeightPusher, server_flags

    rank, world = _rank()
    fleet, urls, lora = None, list(engine.urls), _lora_rank(policy)
    if engine.launch:
        error = None
        if rank == 0:
            fleet = ServerFleet(Path(engine.run_dir or ".") / "servers", engine.launch)
            model = base_model(policy)
            dtype = str(engine.compute_dtype or next(model.parameters()).dtype).removeprefix("torch.")
            flags, env = server_flags(engine.resolved_transfer(), lora or None)
            max_len = engine.max_model_len or getattr(model.config, "max_position_embeddings", None)
            try:
                urls = fleet.start(_model_dir(engine, policy), env=serve_env(env),
                                   command_args=dict(dtype=dtype, max_model_len=max_len,
                                                     logprobs_mode=engine.logprobs_mode,
                                                     kv_cache_gib=_launched_kv_cache_gib(engine.kv_cache_gib),
                                                     extra=[*flags, *engine.launch_args]),
                                   cpu_sets=engine.cpu_sets)
                log.info("started %d rollout server(s) at %s (logs in %s)", len(urls), ", ".join(urls), fleet.log_dir)
            except ServerError as failure:
                error = str(failure)
        urls, error = _from_rank_zero((urls, error))
        if error is not None:
            raise RuntimeError(f"sampling.server.launch={engine.launch}: {error}")
    engine.lora = bool(lora)
    if lora:
        engine.model = engine.model or "policy"  # requests name the adapter the pusher loads
    pusher = WeightPusher(urls, backend=engine.transfer if engine.transfer != "auto" else "auto",
                          bucket_mb=engine.bucket_mb, timeout_s=engine.push_timeout_s, lora=bool(lora),
                          adapter_name=engine.model or "policy", adapter_dir=engine.adapter_dir)
    try:
        pusher.start(policy, rank=rank, world_size=world)
    except Exception:
        if fleet is not None:
            fleet.stop()
        raise
    return urls, fleet, pusher


def _launched_kv_cache_gib(kv_cache_gib: float | None) -> float | None:
    """A launched server's KV cache: as set, else 1 GiB on a CPU, as the in-process engine's
    (vLLM's own default there asks for 92% of the machine's memory and refuses to start
    beside a trainer), and vLLM's share of the device on a GPU."""
    if kv_cache_gib is not None:
        return kv_cache_gib
    return None if torch.cuda.is_available() else 1.0


def _lora_rank(policy: nn.Module) -> int:
    from lightning_unified.models.lora import is_lora

    if not is_lora(policy):
        return 0
    return max(config.r for config in policy.peft_config.values())


def push_to_servers(engine, policy: nn.Module, version: int):
    """Version ``version`` of the policy's weights onto every live server (every rank calls
    it: rank 0 drives the transfer, the others join its gathers). Drained: every rank's
    requests have come back first, and each server drains its own; in flight: each server
    freezes its requests and goes on with them after. A server the push failed on is left out
    of sampling (the pusher left it paused): none is sampled with half its weights."""
    from lightning_unified.engines.transfer import WeightPushError

    _, world = _rank()
    if world > 1 and not engine.updates_in_flight:
        torch.distributed.barrier()  # drained: every rank's producer is idle before the push
    for server in engine.servers:  # rank 0's view drives the push (its targets are shared)
        if server.down is not None:
            engine.pusher.leave_out(server.url, server.down)
    try:
        stats = engine.pusher.push(policy, version, pause="keep" if engine.updates_in_flight else "wait")
    except WeightPushError as error:
        stats = error.stats
    record = PushRecord(version, stats.bytes, stats.seconds)
    for server in engine.servers:
        held = stats.servers.get(server.url)
        if server.url not in stats.failures and held is not None and str(held) == str(version):
            server.version = version
            record.servers.append(server.url)
        elif server.down is None:
            engine._leave_out(server, RuntimeError(stats.failures.get(
                server.url, f"it holds version {held}, not {version}, after the push")))
    if not record.servers:
        raise ServerError(", ".join(s.url for s in engine.servers), f"no rollout server holds version {version} "
                                                                   f"after its push: " + "; ".join(
                                                                       f"{s.url}: {s.down}" for s in engine.servers))
    return record
