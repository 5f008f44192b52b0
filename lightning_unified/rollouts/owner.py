"""The one owner of a run's rollouts: the engine (built, started on first use, synced with
the policy's weights on schedule, put to sleep between rollouts, closed), the version of the
weights it holds, and, with ``max_lag``, the producer thread, its stream and events, and the
batches it samples ahead of the trainer. The sample stage asks it for a batch's rows and
nothing else; validation and a self-teacher scored by the engine ask it for the engine::

    rows = rollouts.rows(trainer, host, batch, batch_idx)   # sampled now, or taken from the queue
    with rollouts.engine_for(step) as engine:               # started, woken and synced for ``step``
        rollout = engine.generate(...)
    # the engine rests again (vLLM's sleep mode frees its memory for the training step)

The engine holds the policy's weights as of the latest optimizer step (or of every
``sync_every``-th: sampling from stale weights on purpose, which the importance ratio
corrects). With ``max_lag`` the engine holds weights of its own and takes new ones only
while the producer is idle, at a batch boundary, so a batch is never sampled from two
versions; every other use of the engine (validation, a teacher scored by it) waits for the
producer first. Engines themselves know nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from lightning_unified.engines import RolloutEngine, build_engine
from lightning_unified.rollouts.ahead import BatchesAhead
from lightning_unified.rollouts.producer import RolloutProducer
from lightning_unified.rollouts.ranks import gather_ranks, rank_and_world_size, this_ranks
from lightning_unified.rollouts.requests import sampling_request, sampling_seed
from lightning_unified.rollouts.rows import sample_rows

# every owner in this process: an engine's shutdown needs the process group, so the
# process's last act before destroying the group is to close them (close_all)
_OWNERS: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
    for owner in list(_OWNERS):
        owner.close()


class Rollouts:
    """``policy``: the model whose weights the engine follows. ``name`` and ``options``: the
    engine (``hf``, ``vllm``) and its settings; ``sampling``: the run's temperature, top_k,
    top_p and behaviour. ``max_lag`` >= 1: a producer thread samples ahead
    (``producer_threads``: its torch threads). ``data_source``: the run's
    :class:`~lightning_unified.specs.OnPolicy`, whose batches :meth:`rows` samples."""

    def __init__(self, policy: nn.Module, name: str = "hf", options: dict | None = None, sync_every: int = 1,
                 max_lag: int = 0, producer_threads: int | None = None, data_source=None, **sampling):
        if sync_every < 1:
            raise ValueError(f"sampling.sync_every must be >= 1, got {sync_every}")
        self.policy, self.sync_every, self.data_source = policy, sync_every, data_source
        self.engine: RolloutEngine = build_engine(name, options, own_weights=max_lag > 0, **sampling)
        self.producer = RolloutProducer(producer_threads) if max_lag > 0 else None
        # the batches sampled ahead of the trainer (max_lag >= 1)
        self.ahead = BatchesAhead(self, max_lag) if max_lag > 0 else None
        self._started = False
        self._resting = False
        self._synced_step: float | None = None
        self._sync_event = None  # recorded on the syncing stream after the latest sync (a GPU's)
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
        options = sampling.server if sampling.engine == "server" else sampling.vllm
        return cls(policy, sampling.engine, options, sampling.sync_every, sampling.max_lag,
                   sampling.producer_threads, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, behaviour=sampling.behaviour)

    @classmethod
    def for_data_source(cls, policy: nn.Module, data_source) -> Rollouts:
        """The owner of a data source's rollouts (one that samples nothing: the ``hf``
        engine, for validation alone)."""
        owner = cls.for_sampling(policy, data_source.sampling if data_source.samples else None)
        owner.data_source = data_source if data_source.samples else None
        return owner

    # --- the engine ----------------------------------------------------------------------
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
        the weights version the engine then holds; on a GPU it runs after the sync's copies."""
        if self.producer is None:
            raise RuntimeError("Rollouts.produce needs max_lag >= 1")
        engine = self._ready(optimizer_step)  # waits for the producer only when new weights are due
        version = self.weights_version(optimizer_step)
        self.producer.submit(key, lambda: job(engine, version), after=self._sync_event)

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
            if self.producer is not None and not getattr(self.engine, "updates_in_flight", False):
                self.producer.wait()  # new weights only into an idle engine: one version per batch
                # and on a GPU only after its kernels that read the old ones (a job without a
                # host sync, such as a score, may still have them queued)
                self.producer.order.before_overwrite()
            # (servers that update in flight pause their requests for the push themselves: the
            # tokens after it come from the new weights, each with its version)
            started = time.perf_counter()
            if self._started:
                self.engine.sync(self.policy, version=int(optimizer_step))
            else:
                self.engine.start(self.policy, version=int(optimizer_step))  # starting loads the current weights
                self._started = True
            self._synced_step = optimizer_step
            self._sync_seconds = time.perf_counter() - started
            if self.producer is not None:
                # the producer's jobs read these weights from another stream: after the copies
                self.producer.order.bind(_device_of(self.policy))
                self._sync_event = self.producer.order.mark()
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

    def log_sync(self, host) -> None:
        """The last start or sync, once: its seconds and what it moved (``sampling/sync_mb``:
        the whole model, or a LoRA policy's adapters alone), and for served engines the
        requests and pushes that failed since the start (``sampling/server_failures``)."""
        seconds = self.take_sync_seconds()
        if seconds is not None:
            host.log("sampling/sync_seconds", seconds, batch_size=1)
            if self.engine.sync_bytes is not None:
                host.log("sampling/sync_mb", self.engine.sync_bytes / 2**20, batch_size=1)
        failures = getattr(self.engine, "server_failures", None)
        if failures is not None:
            host.log("sampling/server_failures", float(failures), batch_size=1)

    def take_sync_seconds(self) -> float | None:
        """Seconds of the start or sync since the last call (None: none), once."""
        seconds, self._sync_seconds = self._sync_seconds, None
        return seconds

    # --- a training batch's rows -----------------------------------------------------------
    def request(self, trainer, host, epoch: int, batch_idx: int):
        """What the engine is asked for one training batch on this rank, whenever it is
        sampled: the same draws now, ahead of the trainer, or after a resume."""
        return sampling_request(self.data_source.sampling, host,
                                seed=sampling_seed(self.data_source.seed, epoch, batch_idx, trainer.global_rank),
                                synced=trainer.world_size > 1,
                                cancelled=self.producer.stopping if self.producer is not None else None)

    def sample(self, engine, host, prompts: dict, request) -> dict:
        """A batch's rows from ``engine`` (:func:`~lightning_unified.rollouts.rows.sample_rows`)."""
        return sample_rows(engine, host, prompts, request, self.data_source)

    def rows(self, trainer, host, batch: dict, batch_idx: int) -> dict:
        """Batch ``batch_idx``'s sampled rows and the weights version that sampled them:
        sampled now (at lag 0), or taken from the batches sampled ahead, after which the
        batches up to ``max_lag`` ahead are handed to the producer."""
        step = host.progress["optimizer_steps"]
        if self.ahead is not None:
            rows = self.ahead.rows_for(trainer, host, batch, batch_idx)
            self.ahead.feed(trainer, host, batch_idx)  # then the batches ahead, from this step's weights
            self.log_sync(host)
            return rows
        request = self.request(trainer, host, trainer.current_epoch, batch_idx)
        # the engine rests again after the block: its memory is the training step's until the next rollout
        with self.engine_for(step) as engine:
            self.log_sync(host)  # started and synced: what follows is generation
            rows = self.sample(engine, host, batch, request)
        # the weights that sampled: older than the policy's when the engine syncs every few steps
        rows["version"] = self.weights_version(step)
        return rows

    def feed(self, trainer, host, batch_idx: int) -> None:
        """At a batch that is not sampled (a mixed source's data batch): the batches ahead
        still go to the producer."""
        if self.ahead is not None:
            self.ahead.feed(trainer, host, batch_idx)

    def after_batch(self, host, outputs, batch: dict) -> None:
        """A stale batch's lag, apart from the engine's mismatch (the batches sampled ahead)."""
        if self.ahead is not None:
            self.ahead.log_lag_and_mismatch(host, outputs, batch)

    # --- the run's course --------------------------------------------------------------------
    def on_train_start(self, trainer, host) -> None:
        if self.ahead is not None:
            self.ahead.on_train_start(trainer, host)

    def cancel(self, timeout: float | None = None) -> None:
        """Drop the batches not sampled yet and stop the one being sampled (a run that ends
        or fails: no one will train on them), waiting ``timeout`` seconds at most for it. The
        checkpoints that keep the rows sampled ahead are written before."""
        if self.producer is not None:
            self.producer.cancel(timeout)

    def state_dict(self) -> dict:
        """Every rank's batches sampled ahead, with the loader's batches they came from
        (:mod:`~lightning_unified.rollouts.ranks`): a collective at a lag, which every rank
        calls from the checkpoint's ``on_save_checkpoint``."""
        return gather_ranks(self.ahead.state_dict()) if self.ahead is not None else {}

    def load_state_dict(self, state: dict) -> None:
        state = this_ranks(state, *rank_and_world_size())  # this rank's own batches ahead
        if self.ahead is not None:
            self.ahead.load_state_dict(state)
        else:
            BatchesAhead.check_resumed_lag(state, 0)

    def check_resumable(self, state: dict, rank: int, world_size: int) -> None:
        """What :meth:`load_state_dict` would refuse, refused before anything loads: the
        batches sampled ahead of another number of processes, or at another lag."""
        max_lag = self.ahead.max_lag if self.ahead is not None else 0
        BatchesAhead.check_resumed_lag(this_ranks(state, rank, world_size), max_lag)

    def close(self) -> None:
        """Release the engine (a later :meth:`engine_for` starts it again), after the
        producer's running job; jobs not started are dropped."""
        if self.producer is not None:
            self.producer.close()
        if self._started:
            self.engine.close()
        self._started, self._resting, self._synced_step = False, False, None


def _device_of(policy: nn.Module | None) -> torch.device | None:
    """Where the policy's parameters are now (the producer's stream goes there); None for no policy."""
    if policy is None:
        return None
    parameter = next(policy.parameters(), None)
    return parameter.device if parameter is not None else None
