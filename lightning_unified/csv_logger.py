"""A CSVLogger that appends to a run's ``metrics.csv`` instead of deleting it, and keeps it
consistent with the run's checkpoints.

Lightning's writer deletes an existing metrics file whenever a new writer starts. One run
of ``scripts/train.py`` starts several: the validation of the starting policy, the fit,
the final validation, each spawned process of ``ddp_spawn``, and a resume into the same
directory. Rows must survive all of them.

Rows are flushed as they are logged. A run killed after its last checkpoint may have logged
rows past it; resuming cuts them (:func:`truncate_after_step`), so the resumed run writes
exactly the rows an uninterrupted run would have.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                # the columns already written; a new column rewrites the file with a wider header
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("flush_logs_every_n_steps", 1)  # a killed run loses no row it logged
        super().__init__(*args, **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_after_step(path: str | Path, global_step: int) -> int:
    """Drop the rows a run logged after its checkpoint at ``global_step`` was written: those
    of optimizer steps >= ``global_step`` (Lightning labels a step's rows with its index, and
    a validation with the index of the step before it). Returns how many rows were cut."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fieldnames = list(rows[0].keys()) if rows else []
    kept = [r for r in rows if not r.get("step") or int(r["step"]) < global_step]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
    return len(rows) - len(kept)
