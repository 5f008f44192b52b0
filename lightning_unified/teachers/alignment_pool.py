"""A batch's replies aligned with a teacher's tokens in worker processes, off the training
thread.

Alignment is linear in a reply's length but it is Python, row by row: 256 replies of 2,048
tokens take about 1.6 s of one core (``scripts/benchmark_alignment.py``). Threads would
not overlap it (the GIL); processes do. Each worker gets the two tokenizers once, when it
starts, and then only token ids in and spans out: a batch is cut into one chunk per
worker. Workers come from a ``forkserver`` (forking the trainer would copy the locks of its
threads, torch's and CUDA's, into the child) and import only the alignment itself.

A reply a worker cannot align comes back as its :class:`~lightning_unified.data.alignment.AlignmentError`,
for the bridge to decide what it is (a failed row, or a data error).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from lightning_unified.data.alignment import Alignment, AlignmentError, align_reply

# the worker's tokenizers and settings, set once by its initializer
_worker: dict = {}


def default_workers() -> int:
    """``alignment_workers: null``: a share of the cores each training process may take
    (the ranks of this machine share them, and the trainer and the loader need one each),
    at most 8; none on a machine of fewer than 4 cores, where the training thread aligns."""
    cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = cores // max(ranks, 1) - 2
    return min(8, share) if cores >= 4 and share >= 2 else 0


def _start(student, teacher, student_stops: set[int], teacher_stop: int, unknown_ok: bool) -> None:
    _worker.update(student=student, teacher=teacher, student_stops=student_stops, teacher_stop=teacher_stop,
                   unknown_ok=unknown_ok)


def _align_chunk(rows: list[list[int]]) -> list[Alignment | AlignmentError]:
    out = []
    for ids in rows:
        try:
            out.append(align_reply(ids, _worker["student"], _worker["teacher"], student_stops=_worker["student_stops"],
                                   teacher_stop=_worker["teacher_stop"], unknown_ok=_worker["unknown_ok"]))
        except AlignmentError as error:
            out.append(error)
    return out


class AlignmentPool:
    """``workers`` processes aligning replies of ``student`` tokens with ``teacher``'s
    (:func:`~lightning_unified.data.alignment.align_reply`'s settings), started on first use."""

    def __init__(self, student, teacher, workers: int, *, student_stops: set[int], teacher_stop: int,
                 unknown_ok: bool):
        if workers < 1:
            raise ValueError(f"an alignment pool needs at least one worker, got {workers}")
        self.workers = workers
        self._start_args = (student, teacher, set(student_stops), teacher_stop, unknown_ok)
        self._executor: ProcessPoolExecutor | None = None

    def align(self, rows: list[list[int]]) -> list[Alignment | AlignmentError]:
        """Each row's alignment, or the error that says why it has none, in order."""
        if not rows:
            return []
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                                 initializer=_start, initargs=self._start_args)
        size = -(-len(rows) // self.workers)
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        return [alignment for part in self._executor.map(_align_chunk, chunks) for alignment in part]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_executor": None}  # a copy in another process starts its own
