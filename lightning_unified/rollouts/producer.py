"""The rollout producer: one thread beside the training step that runs sampling jobs in the
order they were given, so batch ``t + k`` is sampled while the trainer trains on batch ``t``
(``sampling.max_lag = k``).

Why a thread and not a process: the engine is colocated with the trainer and its weights
are the training process's tensors, so a sync is a copy in memory, not a transfer; rows
come back as tensors without serialising them; and the heavy work (torch's kernels, vLLM's)
runs outside the GIL. The producer knows nothing of engines or Lightning: a job is a
function of no arguments, keyed by the batch it samples.

On a GPU the jobs run on the producer's one CUDA stream (made once: a stream per job would
fragment the caching allocator), after the event the caller recorded when it synced the
engine's weights on its own stream (the job must not read the weights before the copy has
run), and each job records an event when it ends, which the stream that takes its rows
waits on: the training step's kernels queue behind the rows, not the host behind the GPU.

A job that has not started can be cancelled; the running one is told to stop
(:attr:`RolloutProducer.stopping`, which the ``hf`` engine's generation and the episode
loop poll) and finishes what it is doing. The thread is a daemon, so a crashed run exits
without waiting for rollouts nobody will train on.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch


class CancelledRollout(RuntimeError):
    """A job that was cancelled before it ran has no rows."""


@dataclass
class _Job:
    key: Hashable
    work: Callable[[], Any]
    after: Any = None  # the event the job waits on (the weights' sync), or None
    state: str = "pending"  # pending, running, done, failed, cancelled
    result: Any = None
    error: BaseException | None = None
    ended: Any = None  # the event recorded on the producer's stream when the job ended
    finished: threading.Event = field(default_factory=threading.Event)


class StreamOrder:
    """The producer's one stream and the events that order it against others (``backend``:
    ``torch.cuda``; on a CPU there is nothing to order and every method does nothing)."""

    def __init__(self, device: torch.device | None = None, backend=None):
        self._given_backend = backend
        self.device = self.backend = self._stream = None
        self.streams_made = 0
        self.bind(device, force=True)

    def bind(self, device: torch.device | None, force: bool = False) -> None:
        """Order work on ``device`` (where the policy is now: Lightning moves it after the
        owner is built); a new device gets a new stream."""
        if device == self.device and not force:
            return
        self.device, self._stream = device, None
        self.backend = self._given_backend if self._given_backend is not None else (
            torch.cuda if self.on_gpu else None)

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @property
    def active(self) -> bool:
        return self.backend is not None

    def stream(self):
        """The producer's stream, made on first use."""
        if self._stream is None:
            self._stream = self.backend.Stream(self.device)
            self.streams_made += 1
        return self._stream

    def before_overwrite(self) -> None:
        """The caller's stream waits for all the work queued on the producer's stream (its
        jobs' reads of the engine's weights) before the caller overwrites those weights."""
        if self.active and self._stream is not None:
            self.backend.current_stream(self.device).wait_stream(self._stream)

    def mark(self):
        """An event recorded now on the caller's current stream (after a sync), or None."""
        if not self.active:
            return None
        event = self.backend.Event()
        event.record(self.backend.current_stream(self.device))
        return event

    def run(self, work: Callable[[], Any], after) -> tuple[Any, Any]:
        """``work()`` on the producer's stream, after ``after``; (its result, the event that
        marks its end)."""
        if not self.active:
            return work(), None
        stream = self.stream()
        if after is not None:
            stream.wait_event(after)
        with self.backend.stream(stream):
            out = work()
        ended = self.backend.Event()
        ended.record(stream)
        return out, ended

    def hand_over(self, out: Any, ended) -> None:
        """The taker's stream waits for the job's end, and tensors made on the producer's
        stream are marked used on it: the allocator must not give their memory back to the
        producer's stream before the taker's kernels are done with them."""
        if not self.active or ended is None:
            return
        current = self.backend.current_stream(self.device)
        current.wait_event(ended)
        values = out.values() if isinstance(out, dict) else (out,)
        for value in values:
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                value.record_stream(current)


# every producer alive: at exit, the ones still holding jobs stop before the interpreter goes
_PRODUCERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for producer in list(_PRODUCERS):
        producer.close(timeout=5.0)


class RolloutProducer:
    """Runs jobs one at a time, in submission order, in a thread of its own. ``threads``:
    torch's intra-op threads in that thread (None: torch's default); ``device``: where the
    jobs' tensors live (a CUDA device gives them a stream of their own)."""

    def __init__(self, threads: int | None = None, device: torch.device | None = None, order: StreamOrder | None = None):
        self.threads = threads
        self.order = order if order is not None else StreamOrder(device)
        #: set while the producer is being stopped: a running job may end early
        self.stopping = threading.Event()
        self._jobs: dict[Hashable, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        _PRODUCERS.add(self)

    # --- the caller's side -------------------------------------------------------------
    def submit(self, key: Hashable, job: Callable[[], Any], after=None) -> None:
        """Run ``job`` after every job submitted before it (and, on a GPU, after the event
        ``after``); its result waits under ``key``."""
        if key in self._jobs:
            raise RuntimeError(f"the rollout producer already holds a job for {key!r}")
        entry = _Job(key, job, after)
        self._jobs[key] = entry
        with self._wake:
            self.stopping.clear()
            self._queue.append(entry)
            self._start()
            self._wake.notify()

    def holds(self, key: Hashable) -> bool:
        return key in self._jobs

    def take(self, key: Hashable) -> Any:
        """The result of the job under ``key``, once it has run (its error, raised here)."""
        if key not in self._jobs:
            raise KeyError(f"the rollout producer holds no job for {key!r}; it holds {sorted(self._jobs, key=str)}")
        job = self._jobs.pop(key)
        job.finished.wait()
        if job.state == "cancelled":
            raise CancelledRollout(f"the rollout for {key!r} was cancelled before it ran")
        if job.error is not None:
            raise job.error
        self.order.hand_over(job.result, job.ended)
        return job.result

    def wait(self, timeout: float | None = None) -> bool:
        """Until every job submitted so far has run or been cancelled (the engine is idle);
        with ``timeout``, at most that many seconds in all. True when they all have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in list(self._jobs.values()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.finished.wait(left):
                return False
        return True

    def results(self) -> dict:
        """{key: result} of every job held that ran, after waiting for them: what a
        checkpoint keeps (read on the host, so the jobs' streams are finished first)."""
        self.wait()
        out = {}
        for key, job in self._jobs.items():
            if job.state == "done":
                if job.ended is not None:
                    job.ended.synchronize()
                out[key] = job.result
        return out

    def put(self, key: Hashable, result: Any) -> None:
        """A result from a checkpoint, held as if its job had just run."""
        job = _Job(key, lambda: result, state="done", result=result)
        job.finished.set()
        self._jobs[key] = job

    def cancel(self, timeout: float | None = None) -> list[Hashable]:
        """Drop every job that has not started (it never runs) and tell the running one to
        stop, then wait for it (``timeout``: at most that many seconds: a failing run must
        not hang on a job that does not stop, a vLLM generate or an environment's step);
        returns the keys dropped. The producer takes new jobs after."""
        with self._wake:
            self.stopping.set()
            dropped = []
            while self._queue:
                job = self._queue.popleft()
                job.state = "cancelled"
                job.finished.set()
                dropped.append(job.key)
        self.wait(timeout)
        self._jobs.clear()
        return dropped

    def close(self, timeout: float | None = None) -> None:
        """Cancel what has not run and end the thread (waiting ``timeout`` seconds at most
        for a running job; None: as long as it takes)."""
        self.cancel_pending()
        with self._wake:
            self.stopping.set()
            thread, self._thread = self._thread, None
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout)
        self._jobs.clear()

    def cancel_pending(self) -> None:
        """Drop the jobs that have not started, without waiting for the running one."""
        with self._wake:
            while self._queue:
                job = self._queue.popleft()
                job.state = "cancelled"
                job.finished.set()

    # --- the producer's thread ---------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="rollout-producer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's share of the cores
        me = threading.current_thread()
        while True:
            with self._wake:
                while not self._queue and self._thread is me:
                    self._wake.wait()
                if self._thread is not me:
                    return
                job = self._queue.popleft()
                job.state = "running"
            try:
                job.result, job.ended = self.order.run(job.work, job.after)
                job.state = "done"
            except BaseException as error:  # noqa: BLE001 - handed to the taker, raised there
                job.error, job.state = error, "failed"
            finally:
                job.finished.set()
