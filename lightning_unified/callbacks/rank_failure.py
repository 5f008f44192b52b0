"""A failing rank stops every rank: the error is posted in the process group's key-value
store, and a watcher thread on every other rank ends its process with that error, instead
of leaving it to hang in the next collective until the group's timeout (30 minutes for gloo).
"""

from __future__ import annotations

import os
import sys
import threading

import lightning as L
import torch.distributed as dist
from typing_extensions import override

FAILURE_KEY = "lightning_unified/failed"


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class RankFailureWatch(L.Callback):
    """``poll_seconds``: how often each rank looks for another rank's failure."""

    def __init__(self, poll_seconds: float = 1.0):
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:  # ddp_spawn pickles callbacks; threads and events stay behind
        return {"poll_seconds": self.poll_seconds}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        store = _store()
        if store is None or trainer.world_size < 2 or self._thread is not None:
            return
        rank = trainer.global_rank
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(store, rank), daemon=True,
                                        name="lightning_unified-rank-failure-watch")
        self._thread.start()

    def _watch(self, store, rank: int) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                message = store.get(FAILURE_KEY).decode(errors="replace")
            except Exception:  # the store went away: the group is being torn down
                return
            if message.startswith(f"rank {rank}:"):
                return  # our own failure: this rank is raising it already
            sys.stderr.write(f"\n[rank {rank}] stopping because another rank failed: {message}\n")
            sys.stderr.flush()
            os._exit(1)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        store = _store()
        if store is not None and trainer.world_size > 1:
            try:
                store.set(FAILURE_KEY, f"rank {trainer.global_rank}: {type(exception).__name__}: {exception}")
            except Exception:
                pass  # the store is gone; the timeout remains the last resort

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()
        self._thread = None
