"""Hydra glue: the resolvers configs use, and turning a composed config into objects.

Kept out of ``scripts/train.py`` so tests and notebooks build exactly what the script
builds, from ``hydra.compose``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_unified.csv_logger import AppendingCSVLogger, truncate_after_step
from lightning_unified.module import UnifiedModule
from lightning_unified.pipeline import check_method
from lightning_unified.tasks.addition import checkpoint_path

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

# ${lu.checkpoint:teacher} is the path of a checkpoint shipped with the package
OmegaConf.register_new_resolver("lu.checkpoint", checkpoint_path, replace=True)


class _DropNoise(logging.Filter):
    """Console lines a user cannot act on: Lightning's advertisement for its cloud logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage() and "litmodels" not in record.getMessage()


def quiet_console() -> None:
    """Keep the console to what a user can act on (called by scripts/train.py)."""
    import warnings

    for name in ("lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
                 "lightning.pytorch.trainer.connectors.callback_connector", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    # Lightning and torchdata call deprecated torch APIs internally; nothing for a user to change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")


@dataclass
class Run:
    module: UnifiedModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    output_dir: Path


def build_run(cfg: DictConfig, output_dir: str | Path) -> Run:
    """Every object of a run, from its composed config; metrics go to
    ``<output_dir>/metrics.csv`` and checkpoints to ``<output_dir>/checkpoints``. The method
    is checked before any data or model is loaded."""
    output_dir = Path(output_dir)
    check_trainer_numbers(cfg.trainer)
    data_source = instantiate(cfg.data_source, _convert_="all")
    signal = instantiate(cfg.signal, _convert_="all")
    reference = instantiate(cfg.reference) if cfg.get("reference") else None
    check_method(data_source, signal, reference)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task)
    tokenizer = datamodule.tokenizer
    # objects go in through a partial: instantiate() would turn dataclass kwargs into configs
    module = instantiate(cfg.module, _partial_=True)(
        policy=instantiate(cfg.model, tokenizer=tokenizer),
        tokenizer=tokenizer,
        data_source=data_source,
        signal=signal,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        reference=reference,
    )
    checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True,
                                  every_n_train_steps=cfg.checkpoint_every_n_steps)
    # metrics.csv always; a configured logger (TensorBoard) writes beside it
    loggers = [AppendingCSVLogger(save_dir=output_dir, name="", version="")]
    if cfg.get("logger"):
        loggers.append(instantiate(cfg.logger, _partial_=True)(save_dir=output_dir))
    trainer = instantiate(cfg.trainer, _partial_=True)(
        logger=loggers,
        callbacks=[checkpoints, *instantiate(cfg.get("callbacks") or [])],
        default_root_dir=output_dir,
    )
    return Run(module, datamodule, trainer, output_dir)


def check_trainer_numbers(trainer: DictConfig) -> None:
    """The trainer's counts are whole numbers (a typo like max_steps=abc is named here, not
    met later as a comparison of str and int)."""
    for key in ("max_steps", "max_epochs", "accumulate_grad_batches", "log_every_n_steps"):
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"trainer.{key} must be a whole number, got {value!r}")


def describe_method(cfg: DictConfig, run: Run) -> str:
    """One line saying what this run trains: the method, its signal, the batch, the step size
    and the length, as resolved from every config group and override."""
    source, signal = run.module.data_source, run.module.signal
    kind = _kind(source)
    if source.samples and source.probability < 1:
        kind = f"mixed (sampled with probability {source.probability:g})"
    parts = [f"method: data_source={kind} signal={_kind(signal)}"]
    if getattr(signal, "rewards", None):
        parts.append("rewards " + " + ".join(f"{r.weight:g} x {_name(r.fn)}" for r in signal.rewards))
    if hasattr(signal, "divergence"):
        teacher = signal.teacher if signal.cache is None else f"cache {signal.cache}"
        parts.append(f"{signal.divergence} to teacher {teacher}")
    batch = cfg.task.get("batch_size")
    if source.samples:
        parts.append(f"{batch} prompts x {source.sampling.num_generations} samples per batch")
    else:
        parts.append(f"{batch} examples per batch")
    lr = cfg.optimizer.get("lr") if cfg.get("optimizer") else None
    parts.append(f"lr {lr:g}" if isinstance(lr, (int, float)) else "lr (optimizer default)")
    steps = cfg.trainer.get("max_steps", -1)
    parts.append(f"{steps} steps" if steps and steps > 0 else f"{cfg.trainer.get('max_epochs')} epoch(s)")
    parts.append(f"policy {cfg.model.get('path') or 'a fresh ' + str(cfg.model.config.get('model_type', 'model'))}")
    return " | ".join(parts)


def _kind(spec) -> str:
    return {"OffPolicy": "off_policy", "OnPolicy": "on_policy"}.get(type(spec).__name__, type(spec).__name__.lower())


def _name(fn) -> str:
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__name__", type(fn).__name__)


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint a run continues from: ``ckpt_path``, or with ``resume=true`` the run
    directory's ``checkpoints/last.ckpt``; None for a fresh run."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint")
        return path
    if not cfg.get("resume"):
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(
            f"resume=true, but {last} does not exist: run the same command with hydra.run.dir=<the run's "
            f"directory> to resume it (checkpoints are written every checkpoint_every_n_steps steps), or drop "
            f"resume=true to start afresh"
        )
    return last


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Validate the starting policy, fit, validate again; returns the final metrics. A
    resumed run skips the first validation and continues from its checkpoint, its
    metrics.csv cut back to the rows that checkpoint had seen."""
    run = build_run(cfg, output_dir)
    if run.trainer.is_global_zero:
        log.info(describe_method(cfg, run))
    ckpt = resume_checkpoint(cfg, run.output_dir)
    if ckpt is not None:
        if run.trainer.is_global_zero:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            truncate_after_step(run.output_dir / "metrics.csv", state["global_step"])
    elif not cfg.trainer.get("fast_dev_run"):
        # the first val/* row of every run is the starting policy's score
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    # weights_only: a checkpoint holds tensors and plain values only, never code to run
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt, weights_only=True)
    final = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    if cfg.get("save_policy"):
        merged = run.output_dir / f"{cfg.save_policy}_merged" if cfg.get("save_merged") else None
        # every rank: a sharded policy is gathered first
        run.module.save_pretrained(str(run.output_dir / cfg.save_policy), None if merged is None else str(merged))
    return {k: float(v) for k, v in (final[0] if final else {}).items()}
