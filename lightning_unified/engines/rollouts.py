"""The one owner of a run's rollout engine: it builds it, starts it on first use, syncs it
with the policy's weights on schedule, puts it to sleep between rollouts, knows which
weights it holds, and closes it. Stages and validation ask it for the engine::

    with rollouts.engine_for(step) as engine:   # started, woken and synced for ``step``
        rollout = engine.generate(...)
    # the engine rests again (vLLM's sleep mode frees its memory for the training step)

The engine holds the policy's weights as of the latest optimizer step (or of every
``sync_every``-th: sampling from stale weights on purpose, which the importance ratio
corrects). With ``max_lag`` it also owns the producer thread that samples ahead of the
trainer (:meth:`produce`, :meth:`take`): the engine then holds weights of its own, takes new
ones only while the producer is idle, at a batch boundary, so a batch is never sampled from
two versions, and every other use of the engine (validation, a teacher scored by it) waits
for the producer first. Engines themselves know nothing of Lightning; this owner does not
either.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator

from torch import nn

from lightning_unified.engines import RolloutEngine, build_engine
from lightning_unified.engines.producer import RolloutProducer

# every owner in this process: an engine's shutdown needs the process group, so the
# process's last act before destroying the group is to close them (close_all)
_OWNERS: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
    for owner in list(_OWNERS):
        owner.close()


class Rollouts:
    """``policy``: the model whose weights the engine follows. ``name`` and ``options``:
    the engine (``hf``, ``vllm``) and its settings; ``sampling``: the run's temperature,
    top_k, top_p and behaviour. ``max_lag`` >= 1: a producer thread samples ahead
    (``producer_threads``: its torch threads)."""

    def __init__(self, policy: nn.Module, name: str = "hf", options: dict | None = None, sync_every: int = 1,
                 max_lag: int = 0, producer_threads: int | None = None, **sampling):
        if sync_every < 1:
            raise ValueError(f"sampling.sync_every must be >= 1, got {sync_every}")
        self.policy, self.sync_every = policy, sync_every
        self.engine: RolloutEngine = build_engine(name, options, own_weights=max_lag > 0, **sampling)
        self.producer = RolloutProducer(producer_threads) if max_lag > 0 else None
        self._started = False
        self._resting = False
        self._synced_step: float | None = None
        self._depth = 0  # engine_for blocks open now: the engine rests when the last one closes
        # seconds the latest start or sync took, for the sample stage to log (None: none since)
        self._sync_seconds: float | None = None
        _OWNERS.add(self)

    @classmethod
    def for_sampling(cls, policy: nn.Module, sampling=None) -> Rollouts:
        """The owner a :class:`~lightning_unified.specs.Sampling` spec asks for (None: the
        ``hf`` engine, for validation alone)."""
        if sampling is None:
            return cls(policy)
        return cls(policy, sampling.engine, sampling.vllm, sampling.sync_every, sampling.max_lag,
                   sampling.producer_threads, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, behaviour=sampling.behaviour)

    @contextlib.contextmanager
    def engine_for(self, optimizer_step: float) -> Iterator[RolloutEngine]:
        """The engine, awake, started and synced as the schedule says for ``optimizer_step``;
        it rests when the outermost such block ends (validation holds it for its whole
        epoch, each batch inside). The producer, if any, finishes its jobs first."""
        if self.producer is not None:
            self.producer.wait()
        engine = self._ready(optimizer_step)
        self._depth += 1
        try:
            yield engine
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._rest()

    def produce(self, key, optimizer_step: float, job) -> None:
        """At a batch boundary: once the producer is idle, sync the engine for
        ``optimizer_step`` (here, in the caller's thread, while nothing else reads the
        policy's weights), then hand ``job(engine, version)`` to the producer's thread, with
        the weights version the engine then holds."""
        if self.producer is None:
            raise RuntimeError("Rollouts.produce needs max_lag >= 1")
        engine = self._ready(optimizer_step)  # waits for the producer only when new weights are due
        version = self.weights_version(optimizer_step)
        self.producer.submit(key, lambda: job(engine, version))

    def take(self, key):
        """The result of the job :meth:`produce` handed over under ``key`` (waits for it)."""
        return self.producer.take(key)

    def _ready(self, optimizer_step: float) -> RolloutEngine:
        if self.engine.shares_weights:
            return self.engine
        woke, self._resting = self._resting, False
        if woke:  # the weights' memory first; the KV cache once a sync has filled it
            self.engine.wake_weights()
        forgot = woke and self.engine.forgets_weights_asleep  # vLLM's sleep level 2
        if not self._started or forgot or optimizer_step - self._synced_step >= self.sync_every:
            if self.producer is not None:
                self.producer.wait()  # new weights only into an idle engine: one version per batch
            started = time.perf_counter()
            if self._started:
                self.engine.sync(self.policy)
            else:
                self.engine.start(self.policy)  # starting loads the current weights
                self._started = True
            self._synced_step = optimizer_step
            self._sync_seconds = time.perf_counter() - started
        if woke:
            self.engine.wake()
        return self.engine

    def _rest(self) -> None:
        """The engine may free its memory for the training step (vLLM's sleep mode, where
        ``sampling.vllm.sleep`` asks for it); the next :meth:`engine_for` wakes it."""
        if self._started and not self.engine.shares_weights:
            self.engine.sleep()
            self._resting = True

    def weights_version(self, optimizer_step: float) -> int:
        """The optimizer step whose weights the engine holds: ``optimizer_step`` itself for an
        engine that reads the training model, else the step of its last sync."""
        if self.engine.shares_weights or self._synced_step is None:
            return int(optimizer_step)
        return int(self._synced_step)

    def take_sync_seconds(self) -> float | None:
        """Seconds of the start or sync since the last call (None: none), once."""
        seconds, self._sync_seconds = self._sync_seconds, None
        return seconds

    def close(self) -> None:
        """Release the engine (a later :meth:`engine_for` starts it again), after the
        producer's running job; jobs not started are dropped."""
        if self.producer is not None:
            self.producer.close()
        if self._started:
            self.engine.close()
        self._started, self._resting, self._synced_step = False, False, None
