"""Hydra glue: the resolvers configs use, and turning a composed config into objects.

Kept out of ``scripts/train.py`` so tests and notebooks build exactly what the script
builds, from ``hydra.compose``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_unified.callbacks.export import PolicyExport, policy_export
from lightning_unified.config_checks import check_config
from lightning_unified.csv_logger import AppendingCSVLogger, truncate_after_step
from lightning_unified.loggers import ConfigLog, finish_loggers, flat_config
from lightning_unified.module import UnifiedModule
from lightning_unified.pipeline import build_batch_pipeline
from lightning_unified.callbacks.progress_bar import step_progress_bar
from lightning_unified.rewards.scoring import names_parameter, reward_name
from lightning_unified.schedule import epochs_for, planned_steps
from lightning_unified.specs import Preference, RewardPairs
from lightning_unified.tasks.addition import checkpoint_path

log = logging.getLogger(__name__)
# what a distributed checkpoint's directory keeps beside its shards (Lightning's name)
DISTRIBUTED_METADATA = "meta.pt"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

# ${lu.checkpoint:teacher} is the path of a checkpoint shipped with the package
OmegaConf.register_new_resolver("lu.checkpoint", checkpoint_path, replace=True)


def world_size(devices, num_nodes) -> int:
    """Ranks of a run on ``num_nodes`` machines of ``devices`` processes each; ``auto`` or -1:
    every GPU this machine has (the trainer=fsdp2_gpu shard group spans them all)."""
    if devices in ("auto", -1, "-1"):
        devices = max(1, torch.cuda.device_count())
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str):
        devices = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return int(devices) * int(num_nodes)


# ${lu.world_size:${trainer.devices},${trainer.num_nodes}}: the FSDP2 presets' data_parallel_size
OmegaConf.register_new_resolver("lu.world_size", world_size, replace=True)


class _DropNoise(logging.Filter):
    """Console lines a user cannot act on: Lightning's advertisement for its cloud logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage() and "litmodels" not in record.getMessage()


class _LogFileOnly(logging.Filter):
    """Records for the run's log file alone: the console says the same in other words (the
    failed run's line, which the script prints as the error's one message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "log_file_only", False)


def quiet_console() -> None:
    """Keep the console to what a user can act on (called by scripts/train.py)."""
    import warnings

    for name in ("lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
                 "lightning.pytorch.trainer.connectors.callback_connector", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_LogFileOnly())
    # Lightning and torchdata call deprecated torch APIs internally; nothing for a user to change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")
    # logger=mlflow appends each sample log to its table artifact, reading the table back first:
    # MLflow draws a download bar for each, unless told otherwise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class Run:
    module: UnifiedModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    output_dir: Path


def build_run(cfg: DictConfig, output_dir: str | Path, resume_state: dict | None = None) -> Run:
    """Every object of a run, from its composed config; metrics go to
    ``<output_dir>/metrics.csv`` and checkpoints to ``<output_dir>/checkpoints``. The config
    and the method are checked before any data or model is loaded; with ``resume_state``
    (the checkpoint a run continues from) the data is checked against it before the model."""
    output_dir = Path(output_dir)
    check_config(cfg)  # every key with a type or a range, named
    data_source = instantiate(cfg.data_source, _convert_="all")
    signal = instantiate(cfg.signal, _convert_="all")
    reference = instantiate(cfg.reference) if cfg.get("reference") else None
    validation = instantiate(cfg.validation, _convert_="all") if cfg.get("validation") else None
    # the method and the stages in their order, checked before any data or model loads
    stages = instantiate(cfg.module.get("stages") or [], _convert_="all")
    build_batch_pipeline(data_source, signal, reference, stages, cfg.module.get("temperature"))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task)
    if resume_state is not None and hasattr(datamodule, "load_state_dict"):
        # Lightning keeps a data module's state under its class name; other data is refused now
        datamodule.load_state_dict(resume_state.get(type(datamodule).__qualname__) or {})
    check_data_has_responses(datamodule, data_source, signal)
    tokenizer = datamodule.tokenizer
    # objects go in through a partial: instantiate() would turn dataclass kwargs into configs
    module_cfg = OmegaConf.masked_copy(cfg.module, [k for k in cfg.module if k != "stages"])
    module = instantiate(module_cfg, _partial_=True)(
        stages=stages,
        policy=instantiate(cfg.model, tokenizer=tokenizer),
        tokenizer=tokenizer,
        data_source=data_source,
        signal=signal,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        reference=reference,
        validation=validation,
    )
    checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=last_checkpoint_mode(cfg),
                                  every_n_train_steps=cfg.checkpoint_every_n_steps)
    # metrics.csv always; a configured logger (TensorBoard, W&B, MLflow) writes beside it, given the config
    loggers = [AppendingCSVLogger(save_dir=output_dir, name="", version="")]
    config_log = []
    if cfg.get("logger"):
        loggers.append(instantiate(cfg.logger, _partial_=True)(save_dir=output_dir))
        config_log = [ConfigLog(flat_config(cfg), OmegaConf.to_yaml(cfg, resolve=True))]
    callbacks = [checkpoints, policy_exports(cfg, output_dir), *config_log, *instantiate(cfg.get("callbacks") or [])]
    trainer = instantiate(cfg.trainer, _partial_=True)(
        logger=loggers,
        callbacks=[*callbacks, *step_progress_bar(cfg.trainer, callbacks)],
        default_root_dir=output_dir,
        # trainer.max_steps > 0 overrides the epochs: the data loops as often as the steps take
        max_epochs=epochs_for(cfg.trainer.get("max_steps"), cfg.trainer.get("max_epochs")),
    )
    return Run(module, datamodule, trainer, output_dir)


def policy_exports(cfg: DictConfig, output_dir: Path) -> PolicyExport:
    """The callback that writes the policy as a Hugging Face directory to
    ``<output_dir>/exports/step_<N>`` every ``export_every`` steps (and the final one, see
    :func:`_train`), with a model card stating this config, and keeps the config in every
    checkpoint for scripts/export.py."""
    from hydra.core.hydra_config import HydraConfig

    config = OmegaConf.to_yaml(cfg, resolve=True)  # check_config has resolved it already
    choices = {}
    if HydraConfig.initialized():  # the groups picked on the command line or by the preset
        choices = {k: str(v) for k, v in HydraConfig.get().runtime.choices.items()
                   if v is not None and not k.startswith("hydra")}
    return PolicyExport(output_dir / "exports", every=cfg.get("export_every"), keep=cfg.get("export_keep", 1),
                        merged=bool(cfg.get("save_merged")), config=config, choices=choices,
                        base_model=cfg.model.get("path"))


def last_checkpoint_mode(cfg: DictConfig) -> bool | str:
    """How ``checkpoints/last.ckpt`` is kept. A single-file checkpoint is written to a
    temporary file and moved into place, so a kill never leaves half of one. A distributed
    checkpoint is a directory written shard by shard in place: rewriting last.ckpt would let
    a kill mix two steps' shards, so last.ckpt is a link to the step's own directory instead,
    moved once that directory is whole."""
    strategy = cfg.trainer.get("strategy")
    distributed = (isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("ModelParallelStrategy")
                   and strategy.get("save_distributed_checkpoint", True))
    return "link" if distributed else True


def check_data_has_responses(datamodule, data_source, signal) -> None:
    """Off-policy data, and the off-policy share of a mixed source, train on the data's
    responses, and rewards that compare with a reference need the data's references: data
    without them is refused at start, not at the first batch that needs them."""
    examples = getattr(datamodule, "train_examples", None)
    if not examples:
        return
    where = getattr(datamodule, "train_path", "the training data")
    rewards = getattr(signal, "rewards", None) or []
    needs = sorted({reward_name(r) for r in rewards if names_parameter(r.fn, "references")})
    if needs and "reference" not in examples[0] and (data_source.samples or getattr(signal, "reward_data", False)):
        raise ValueError(f"signal.rewards {needs} compare each answer with a reference, but {where} has no reference "
                         f"column (task.columns.reference)")
    if data_source.samples and "loss_mask" in examples[0] and getattr(datamodule, "loss_on", None) != "last_assistant":
        raise ValueError(f"{where} holds conversations, and sampling writes one reply to each prompt: set "
                         f"task.loss_on=last_assistant, so that the prompt is each conversation up to its last "
                         f"assistant turn (task.loss_on=all_assistant trains every turn of the data's own replies)")
    uses_data = not data_source.samples or data_source.probability < 1
    if isinstance(signal, RewardPairs) and "chosen_ids" not in examples[0]:
        raise ValueError(f"signal=reward_model trains on preference pairs, but {where} has no chosen and rejected "
                         f"columns (task.columns.chosen, task.columns.rejected; the built-in task: task.pairs=true)")
    if not uses_data or isinstance(signal, (Preference, RewardPairs)):
        return
    if "chosen_ids" in examples[0]:
        # the collator makes a batch of pairs whenever every example has both: a sparse or
        # dense signal would then train on the rejected responses as if they were targets
        raise ValueError(f"{where} has chosen and rejected columns, which only signal=preference reads; "
                         f"this run (signal={type(signal).__name__.lower()}) would train on the rejected responses "
                         f"as well: ignore them with task.columns.chosen=null task.columns.rejected=null")
    if "response_ids" not in examples[0]:
        what = ("data_source=off_policy trains on the data's responses" if not data_source.samples else
                f"data_source=mixed keeps the data's responses in {1 - data_source.probability:.0%} of its batches")
        raise ValueError(f"{what}, but {where} has none (no response column): add one (task.columns.response), "
                         f"or sample every response (data_source=on_policy)")


def describe_method(cfg: DictConfig, run: Run) -> str:
    """One line saying what this run trains: the method, its signal, the batch, the step size
    and the length, as resolved from every config group and override."""
    source, signal = run.module.data_source, run.module.signal
    kind = _kind(source)
    if source.samples and source.probability < 1:
        kind = f"mixed (sampled with probability {source.probability:g})"
    parts = [f"method: data_source={kind} signal={_kind(signal)}"]
    if getattr(signal, "rewards", None) and (source.samples or getattr(signal, "reward_data", False)):
        parts.append("rewards " + " + ".join(f"{r.weight:g} x {reward_name(r)}" for r in signal.rewards))
    if hasattr(signal, "divergence"):
        teacher = f"teacher{'s' if signal.routed else ''} {signal.teacher.describe()}"
        top_k = f" top-{signal.top_k}" if signal.top_k else ""
        parts.append(f"{signal.divergence}{top_k} to {teacher}")
    reference = run.module.reference
    if reference is not None:
        where = reference.describe()
        parts.append(f"{reference.estimator} KL x {reference.kl_coef:g} to reference {where}")
    batch = cfg.task.get("batch_size")
    if source.samples:
        parts.append(f"{batch} prompts x {source.sampling.num_generations} samples per batch")
    else:
        parts.append(f"{batch} examples per batch")
    lr = cfg.optimizer.get("lr") if cfg.get("optimizer") else None
    parts.append(f"lr {lr:g}" if isinstance(lr, (int, float)) else "lr (optimizer default)")
    # the optimizer steps this run will make (accumulation included), as the schedule counts them
    steps = planned_steps(run.trainer, run.datamodule)
    epochs = run.trainer.max_epochs
    parts.append(f"{steps} step{'s' if steps != 1 else ''}" if steps is not None else f"{epochs} epoch(s)")
    parts.append(f"policy {cfg.model.get('path') or 'a fresh ' + str(cfg.model.config.get('model_type', 'model'))}")
    return " | ".join(parts)


def _kind(spec) -> str:
    return {"OffPolicy": "off_policy", "OnPolicy": "on_policy", "RewardPairs": "reward_model"}.get(
        type(spec).__name__, type(spec).__name__.lower())


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint a run continues from: ``ckpt_path``, or with ``resume=true`` the run
    directory's ``checkpoints/last.ckpt``; None for a fresh run."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file() and not path.is_dir():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint")
        return path
    if not cfg.get("resume"):
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    # a file, or under trainer.strategy.save_distributed_checkpoint=true a directory of shards
    if not last.is_file() and not last.is_dir():
        raise FileNotFoundError(
            f"resume=true, but {last} does not exist: run the same command with hydra.run.dir=<the run's "
            f"directory> to resume it (checkpoints are written every checkpoint_every_n_steps steps), or drop "
            f"resume=true to start afresh"
        )
    return last


def check_run_directory(cfg: DictConfig, output_dir: Path) -> None:
    """A run directory holds one run: a new run (no resume=true, no ckpt_path) in a directory
    that already has a run's metrics or checkpoints is refused before anything is written,
    rather than mixing two runs' rows and checkpoints."""
    if cfg.get("resume") or cfg.get("ckpt_path"):
        return
    held = [output_dir / "metrics.csv", output_dir / "checkpoints"]
    held = [p for p in held if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if held:
        raise FileExistsError(
            f"{output_dir} already holds a run ({', '.join(p.name for p in held)}): add resume=true to continue it, "
            f"or give this run a directory of its own (hydra.run.dir=...)"
        )


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint's contents (tensors and plain values only), or an error naming
    the file when it cannot be read (a run killed while writing it, another kind of file).
    A distributed checkpoint (a directory of shards) gives what its ``meta.pt`` holds: all
    but the weights and the optimizer's state, which each rank loads from its shards."""
    if path.is_dir():
        meta = path / DISTRIBUTED_METADATA
        if not meta.is_file():
            raise ValueError(f"{path} is a directory without {DISTRIBUTED_METADATA}, so not a complete distributed "
                             f"checkpoint (a run killed while writing it?): continue from another one with "
                             f"ckpt_path=..., or start afresh in a new directory")
        path = meta
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"it may be truncated or not a checkpoint at all. Continue from another one with ckpt_path=..., or "
            f"start afresh in a new directory"
        ) from error


# what the run's log says last, so that a sweep's report can tell a finished run from a failed one
FINISHED, FAILED = "the run finished", "the run failed"


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Validate the starting policy, fit, validate again; returns the final metrics. A
    resumed run skips the first validation and continues from its checkpoint, its
    metrics.csv cut back to the rows that checkpoint had seen. The run's log ends with
    whether it finished or failed, and why (scripts/compare.py reads it)."""
    try:
        metrics = _train(cfg, output_dir)
    except BaseException as error:
        text = str(error).strip().splitlines()
        log.error("%s: %s%s", FAILED, type(error).__name__, f": {text[0]}" if text else "",
                  extra={"log_file_only": True})  # the console gets the error itself
        raise
    log.info("%s: %s", FINISHED, ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items()) or "no held-out metrics")
    return metrics


def _train(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    check_config(cfg)  # resume and ckpt_path are read before the run is built
    check_run_directory(cfg, Path(output_dir))
    ckpt = resume_checkpoint(cfg, Path(output_dir))
    # every check that can refuse the resume runs before metrics.csv is cut (the data's before the model loads)
    state = read_checkpoint(ckpt) if ckpt is not None else None
    run = build_run(cfg, output_dir, resume_state=state)
    exports = policy_export(run.trainer)
    exports.method = describe_method(cfg, run)  # what the exports' model cards state
    if run.trainer.is_global_zero:
        log.info(exports.method)
    if state is not None:
        run.module.check_resumable(state, run.trainer)
        if run.trainer.is_global_zero:
            truncate_after_step(run.output_dir / "metrics.csv", state["global_step"])
        del state
    elif cfg.get("validate_first", True) and not cfg.trainer.get("fast_dev_run"):
        # the first val/* row of every run is the starting policy's score
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    try:
        # weights_only: a checkpoint holds tensors and plain values only, never code to run
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt, weights_only=True)
        final = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    except BaseException:
        finish_loggers(run.trainer.loggers, failed=True)
        raise
    finish_loggers(run.trainer.loggers, failed=False)
    if cfg.get("save_policy"):
        merged = run.output_dir / f"{cfg.save_policy}_merged" if cfg.get("save_merged") else None
        # every rank: a sharded policy is gathered first; with the final figures in its model card
        exports.write(run.trainer, run.module, run.output_dir / cfg.save_policy, merged)
    # the run is over: its engine goes now, while every rank's process group still exists
    run.module.rollouts.close()
    return {k: float(v) for k, v in (final[0] if final else {}).items()}
