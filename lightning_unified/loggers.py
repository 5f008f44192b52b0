"""The loggers a run adds beside ``metrics.csv`` (``conf/logger/``: TensorBoard, Weights &
Biases, MLflow), and what each of them is given beyond Lightning's scalars: the composed
config as hyperparameters, the sampled completions as a table (or TensorBoard's text panel),
and an end, so that the next run of a sweep or a notebook gets a W&B run of its own."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_unified.lightning_private import started_wandb_run

if TYPE_CHECKING:  # Hydra's config: a run without Hydra (a GPU image, LightningCLI) imports this module too
    from omegaconf import DictConfig

# a run's own MLflow store, under its directory: MLflow's recommended local backend (since
# MLflow 3 a plain directory store, file:./mlruns, is refused unless MLFLOW_ALLOW_FILE_STORE
# is set), and the name `mlflow ui` opens by default when started in the run directory
MLFLOW_DATABASE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"


def mlflow_logger(save_dir: str | Path, tracking_uri: str | None = None, artifact_location: str | None = None,
                  **kwargs: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger, tracking to ``tracking_uri``, else ``MLFLOW_TRACKING_URI``,
    else a SQLite store of the run's own, ``<run dir>/mlflow.db``, with the artifacts (the
    sample tables, config.yaml) in ``<run dir>/mlartifacts``. Lightning's own fallback is a
    ``file:`` store, which MLflow 3 refuses."""
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        save_dir = Path(save_dir).resolve()
        save_dir.mkdir(parents=True, exist_ok=True)
        tracking_uri = f"sqlite:///{save_dir / MLFLOW_DATABASE}"
        # a SQLite store keeps no artifacts itself: without a location they would land in ./mlruns of the cwd
        artifact_location = artifact_location or (save_dir / MLFLOW_ARTIFACTS).as_uri()
    return MLFlowLogger(tracking_uri=tracking_uri, artifact_location=artifact_location, **kwargs)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as one level of ``key.subkey`` names (the names a Hydra override
    uses, and what MLflow's parameters and a W&B table's columns want), values resolved.
    A list stays one value, written as JSON: ``signal.rewards`` is one setting."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (list, dict)):
            flat[prefix] = json.dumps(node, default=str)
        else:
            flat[prefix] = node

    from omegaconf import OmegaConf

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class ConfigLog(L.Callback):
    """Logs the run's composed config to every logger but the CSV file (the run directory's
    ``.hydra/config.yaml`` holds it already), once, when the trainer first runs (its ranks are
    known then: Lightning's loggers write on global rank 0 only). MLflow truncates a parameter
    at 250 characters (Lightning's MLFlowLogger), so it also gets the whole config as the
    artifact ``config.yaml``."""

    def __init__(self, params: dict[str, Any], yaml: str):
        self.params = params
        self.yaml = yaml
        self._logged = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._logged:
            return
        self._logged = True
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                continue
            logger.log_hyperparams(self.params)
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                logger.experiment.log_text(logger.run_id, self.yaml, "config.yaml")


def log_samples(loggers: list[Logger], split: str, rows: list[dict], step: int) -> None:
    """``rows`` (a sample log's prompts, completions and scores) as each logger shows them:
    a W&B table ``samples/<split>`` per write, MLflow's table artifact ``samples/<split>.json``
    (each write appends its rows; ``mlflow.load_table`` reads it), TensorBoard's text panel.
    Called on global rank 0 only."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(f"samples/{split}", columns=columns, data=[[row.get(c) for c in columns] for row in rows],
                             step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_table(logger.run_id, {c: [row.get(c) for row in rows] for c in columns},
                                        f"samples/{split}.json")
        elif isinstance(logger, TensorBoardLogger):
            text = "\n\n".join(f"**prompt** {r['prompt']}\n\n**completion** {r['completion']}" for r in rows)
            logger.experiment.add_text(f"samples/{split}", text, step)


@rank_zero_only
def finish_loggers(loggers: list[Logger], failed: bool) -> None:
    """Ends the W&B run a logger started (the run's file gets its exit record). Lightning
    leaves it open until the process exits, so the next run of a sweep in the same process
    would log into it (WandbLogger reuses ``wandb.run``). MLflow's run is ended by Lightning
    after each fit and validate."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = started_wandb_run(logger)
            if run is not None and hasattr(run, "finish"):
                run.finish(exit_code=1 if failed else 0)
