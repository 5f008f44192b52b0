"""A CSVLogger that appends to a run's ``metrics.csv`` instead of deleting it.

Lightning's writer deletes an existing metrics file whenever a new writer starts. One run
of ``scripts/train.py`` starts several: the validation of the starting policy, the fit,
the final validation, each spawned process of ``ddp_spawn``, and a resume into the same
directory. Rows must survive all of them.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                # the columns already written; a new column rewrites the file with a wider header
                self.metrics_keys = sorted(next(csv.reader(file), []))


class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
