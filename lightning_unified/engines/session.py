"""One rollout engine for a run, started on first use and holding the policy's weights as of
the latest optimizer step (or of every ``sync_every``-th: sampling from stale weights on
purpose, which the importance ratio corrects)."""

from __future__ import annotations

import time
import weakref

from torch import nn

from lightning_unified.engines import RolloutEngine, build_engine


# every session of this process, so the process can shut their engines down before its
# process group goes (close_all)
_SESSIONS: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
    for session in list(_SESSIONS):
        session.close()


class EngineSession:
    def __init__(self, name: str = "hf", options: dict | None = None, sync_every: int = 1, **sampling):
        if sync_every < 1:
            raise ValueError(f"sampling.sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self._engine: RolloutEngine = build_engine(name, options, **sampling)
        self._started = False
        self._resting = False
        self._synced_step: float | None = None
        # seconds the latest sync took, for the sampling callback to log (None: no sync since)
        self.last_sync_seconds: float | None = None
        _SESSIONS.add(self)

    @classmethod
    def for_sampling(cls, sampling=None) -> EngineSession:
        """The session a :class:`~lightning_unified.specs.Sampling` spec asks for (None: the
        ``hf`` engine, for validation alone)."""
        if sampling is None:
            return cls()
        return cls(sampling.engine, sampling.vllm, sampling.sync_every, temperature=sampling.temperature,
                   top_k=sampling.top_k, top_p=sampling.top_p, behaviour=sampling.behaviour)

    def ready(self, policy: nn.Module, optimizer_step: float) -> RolloutEngine:
        """The engine, started and synced as the schedule says for ``optimizer_step``."""
        if self._engine.shares_weights:
            return self._engine
        if self._resting:
            self._engine.wake()
            self._resting = False
        if not self._started:
            started = time.perf_counter()
            self._engine.start(policy)  # starting loads the current weights
            self._started, self._synced_step = True, optimizer_step
            self.last_sync_seconds = time.perf_counter() - started
        elif optimizer_step - self._synced_step >= self.sync_every:
            started = time.perf_counter()
            self._engine.sync(policy)
            self._synced_step = optimizer_step
            self.last_sync_seconds = time.perf_counter() - started
        return self._engine

    def weights_version(self, optimizer_step: float) -> int:
        """The optimizer step whose weights the engine holds: ``optimizer_step`` itself for an
        engine that reads the training model, else the step of its last sync."""
        if self._engine.shares_weights or self._synced_step is None:
            return int(optimizer_step)
        return int(self._synced_step)

    def rest(self) -> None:
        """The rollout is done: the engine may free its memory for the training step (vLLM's
        sleep mode, where ``sampling.vllm.sleep`` asks for it); the next :meth:`ready` wakes it."""
        if self._started and not self._engine.shares_weights:
            self._engine.sleep()
            self._resting = True

    def take_sync_seconds(self) -> float | None:
        """Seconds of the sync since the last call (None: none), once."""
        seconds, self.last_sync_seconds = self.last_sync_seconds, None
        return seconds

    def close(self) -> None:
        if self._started:
            self._engine.close()
        self._started = False
