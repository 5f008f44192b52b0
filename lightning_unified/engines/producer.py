"""The rollout producer: one thread beside the training step that runs sampling jobs in the
order they were given, so batch ``t + k`` is sampled while the trainer trains on batch ``t``
(``sampling.max_lag = k``).

Why a thread and not a process: the engine is colocated with the trainer and its weights
are the training process's tensors, so a sync is a copy in memory, not a transfer; rows
come back as tensors without serialising them; and the heavy work (torch's kernels, vLLM's)
runs outside the GIL. The producer knows nothing of engines or Lightning: a job is a
function of no arguments, keyed by the batch it samples. An engine on another device or
node keeps this interface (submit a batch's prompts with a weights version, take its rows
later): ``docs/guides/async_rollouts.md`` says what it would change.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class RolloutProducer:
    """Runs jobs one at a time, in submission order, in a thread of its own. ``threads``:
    torch's intra-op threads in that thread (None: torch's default)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: dict[Hashable, Future] = {}

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-producer",
                                                initializer=self._set_threads)
        return self._executor

    def _set_threads(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's share of the cores

    def submit(self, key: Hashable, job: Callable[[], Any]) -> None:
        """Run ``job`` after every job submitted before it; its result waits under ``key``."""
        if key in self._jobs:
            raise RuntimeError(f"the rollout producer already holds a job for {key!r}")
        self._jobs[key] = self._pool().submit(job)

    def holds(self, key: Hashable) -> bool:
        return key in self._jobs

    def take(self, key: Hashable) -> Any:
        """The result of the job under ``key``, once it has run (its error, raised here)."""
        if key not in self._jobs:
            raise KeyError(f"the rollout producer holds no job for {key!r}; it holds {sorted(self._jobs, key=str)}")
        return self._jobs.pop(key).result()

    def wait(self) -> None:
        """Until every job submitted so far has run (the engine is idle after)."""
        for job in list(self._jobs.values()):
            job.exception()  # waits; an error stays for take to raise

    def results(self) -> dict:
        """{key: result} of every job held, after waiting for them: what a checkpoint keeps."""
        return {key: job.result() for key, job in self._jobs.items()}

    def put(self, key: Hashable, result: Any) -> None:
        """A result from a checkpoint, held as if its job had just run."""
        done: Future = Future()
        done.set_result(result)
        self._jobs[key] = done

    def clear(self) -> None:
        """Forget every job (waiting for the one running: a job cannot be interrupted)."""
        for job in self._jobs.values():
            job.cancel()
        self.wait()
        self._jobs.clear()

    def close(self) -> None:
        self.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
