"""UnifiedModule: one LightningModule for every method.

A training step is :mod:`lightning_unified.step`, top to bottom; each Lightning hook here
calls one of its functions. What differs between methods is which stages run
(:mod:`lightning_unified.pipeline`) and which weight builders the loss gets
(:mod:`lightning_unified.builder_choice`). What a stage may read of this module is
:class:`lightning_unified.stages.host.PolicyHost`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_unified import step
from lightning_unified.data.chat import stop_token_ids
from lightning_unified.distributed import destroy_process_group_at_exit
from lightning_unified.failures import FailedRows
from lightning_unified.rollouts import Rollouts
from lightning_unified.rollouts.ranks import saved_rollouts
from lightning_unified.host_memory import keep_freed_host_memory, return_freed_host_memory
from lightning_unified.lightning_private import attached_trainer
from lightning_unified.losses.aggregation import AGGREGATIONS, StepSums
from lightning_unified.metrics import DeviceMetrics, FlopsModel, peak_flops_per_device
from lightning_unified.models.checkpoint import fingerprint, read_run_state, save_policy, write_run_state
from lightning_unified.models.loading import trainable_policy
from lightning_unified.models.lora import is_lora
from lightning_unified.models.packing import Packing, uses_varlen_attention
from lightning_unified.models.precision import compute_dtype, half_precision_master
from lightning_unified.models.sharding import evaluate_without_inference_mode, initialise_root, is_sharded, shard_policy
from lightning_unified.objectives import objective_for
from lightning_unified.pipeline import build_batch_pipeline, loop_callbacks, not_yet_held
from lightning_unified.progress import TrainingProgress
from lightning_unified.rollout_updates import RolloutUpdates
from lightning_unified.rules import enforce
from lightning_unified.schedule import configure_optimization
from lightning_unified.specs import Dense, Environment, OffPolicy, OnPolicy, Preference, Reference, Sparse, loss_temperature
from lightning_unified.specs import Validation
from lightning_unified.stages import Stage
from lightning_unified.validation import max_new_tokens, validate_batch, validation_rewards
from lightning_unified.validation_samples import check_correct, validate_samples


class UnifiedModule(L.LightningModule):
    """One LightningModule for every (data_source, signal) pair.

    ``policy`` and ``tokenizer``: a Hugging Face causal LM (peft LoRA too) and its tokenizer,
    or local paths to them. ``optimizer`` and ``scheduler``: partials taking the trainable
    parameters and the optimizer (an unset ``num_training_steps`` gets this fit's steps).
    ``aggregation`` normalises the loss over the whole optimizer step, every micro-batch on
    every rank (None: the signal's own). ``temperature`` divides the policy's logits in the
    loss (None: the sampler's). ``max_new_tokens`` and ``val_rewards`` default to the
    datamodule's. ``validation`` (:class:`~lightning_unified.specs.Validation`) adds k
    sampled answers per held-out prompt to the greedy ones. ``non_finite``: ``skip`` (at most ``max_non_finite_steps`` in a row),
    ``stop`` or None. ``max_failure_fraction``: the run stops once more than this share of
    ``failure_window`` rows of one kind failed (an environment, a reward function or a
    teacher that could not handle them; :mod:`lightning_unified.failures`); fewer are left
    out of the loss and counted. ``stages``: stages of your own, each placed before or after a named one
    (:class:`~lightning_unified.stages.Stage`). ``detailed_metrics``: log the entropy, the
    gradient norm and MFU (each a pass over something large); ``peak_flops``: one device's
    peak FLOP/s for MFU (None: Lightning's table on a GPU; unknown on a CPU, where MFU is not
    logged). Every argument is documented where a run
    sets it: ``conf/train.yaml``'s ``module`` section.
    """

    def __init__(
        self,
        policy: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | str,
        data_source: OffPolicy | OnPolicy,
        signal: Sparse | Dense | Preference,
        optimizer: Callable[[Iterable], Optimizer] | None = None,
        scheduler: Callable[[Optimizer], LRScheduler] | None = None,
        *,
        reference: Reference | None = None,
        aggregation: str | None = None,
        constant_normaliser: float | None = None,
        count_empty: bool = False,
        packing: bool = False,
        max_tokens_per_row: int | None = None,
        temperature: float | None = None,
        chunk_size: int | None = None,
        compile_loss: bool = False,
        max_new_tokens: int | None = None,
        val_rewards: dict[str, Callable] | None = None,
        val_environment: Environment | dict | None = None,
        validation: Validation | dict | None = None,
        samples_every_n_steps: int | None = 50,
        non_finite: str | None = "skip",
        max_non_finite_steps: int = 3,
        max_failure_fraction: float = 0.1,
        failure_window: int = 1000,
        keep_freed_host_memory: bool = True,
        stages: list[Stage] | None = None,
        detailed_metrics: bool = True,
        peak_flops: float | None = None,
    ):
        super().__init__()
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"module.peak_flops must be a positive FLOP/s figure per device, got {peak_flops}")
        aggregation = aggregation or signal.aggregation  # the method's own normaliser
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        # the batch stages in their order, checked before the policy loads
        self.pipeline = build_batch_pipeline(data_source, signal, reference, stages, temperature)
        self.policy, self.tokenizer = trainable_policy(policy, tokenizer)
        # a loss on a head of its own beside the one equation (a reward model's pairs); None for most methods
        self.objective = objective_for(signal, self.policy)
        # EOS and the chat template's end-of-turn token end a response
        self.stop_token_ids = stop_token_ids(self.tokenizer)
        self.data_source, self.signal, self.reference = data_source, signal, reference
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.aggregation, self.constant_normaliser, self.count_empty = aggregation, constant_normaliser, count_empty
        self.temperature = loss_temperature(data_source, temperature)
        # every forward on the batch's sequences (the policy's, the teacher's, the reference's,
        # a sequence ratio's, a preference margin's) packs them end to end when enabled
        self.packing = Packing(packing, max_tokens_per_row)
        self.chunk_size, self.compile_loss = chunk_size, compile_loss
        self._max_new_tokens, self._val_rewards = max_new_tokens, val_rewards
        # validation's episodes (None: the data source's environment, else the task's own)
        self.val_environment = Environment(**val_environment) if isinstance(val_environment, dict) else val_environment
        # k sampled answers per held-out prompt beside the greedy ones (val/pass@k, val/mean@k)
        self.validation = Validation(**validation) if isinstance(validation, dict) else validation or Validation()
        self.keep_freed_host_memory = keep_freed_host_memory
        # what crosses the loop: the stages' end of batch, the sample log, the guards (bad settings fail here)
        self.loop_callbacks = loop_callbacks(samples_every_n_steps, non_finite=non_finite,
                                             max_non_finite_steps=max_non_finite_steps)
        # the one owner of the engine that samples responses and answers validation prompts
        self.rollouts = Rollouts.for_data_source(self.policy, data_source)
        self._validation = contextlib.ExitStack()
        # the optimizer steps each batch makes (PPO's epochs x mini-batches)
        self.updates = RolloutUpdates.for_data_source(data_source)
        self.val_metrics = nn.ModuleDict()
        # several teachers: each one's objective is logged as train/objective/<name>
        self.teacher_names = list(signal.teachers) if isinstance(signal, Dense) and signal.routed else []
        self.step_sums = StepSums(groups=len(self.teacher_names))  # this optimizer step's loss and counts so far
        # rows an environment, a reward function or a teacher could not handle: counted, and the run's limit
        self.failures = FailedRows(max_failure_fraction, failure_window)
        self.clock = TrainingProgress()
        # the step's diagnostics, on the device until its one read (lightning_unified/metrics.py)
        self.step_metrics = DeviceMetrics()
        self.detailed_metrics, self.peak_flops = detailed_metrics, peak_flops
        self.flops_model: FlopsModel | None = None  # set by a fit whose device's peak is known

    @property
    def progress(self) -> dict:
        """What the run has trained on so far: tokens_seen, train_seconds, optimizer_steps."""
        return self.clock.totals

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        evaluate_without_inference_mode(self.trainer)
        # an engine with weights of its own samples in the step's compute dtype (bf16 under
        # bf16-mixed), not in the float32 of the master weights it is synced from
        self.rollouts.engine.compute_dtype = compute_dtype(self.trainer.precision)
        # the self-teacher scored by the rollout engine: a LoRA policy then reaches it merged
        self.rollouts.engine.scores_prompts = isinstance(self.signal, Dense) and self.signal.is_self and self.signal.served
        # where an engine writes what it makes (launched servers' logs and their model)
        self.rollouts.engine.run_dir = Path(self.trainer.default_root_dir)
        if stage == "fit":
            enforce("trainer", self.trainer, self)  # the rules that read the trainer
            if self.trainer.strategy.root_device.type == "cpu":
                # on a CPU every step's tensors are malloc'd: keep what the last step freed
                # (fast), or give it back at once (small)
                keep_freed_host_memory() if self.keep_freed_host_memory else return_freed_host_memory()
            if self.packing.enabled:
                rank_zero_info(self.packing.describe(uses_varlen_attention(self.policy)))
            peak = peak_flops_per_device(self.peak_flops, self.trainer.strategy.root_device,
                                         compute_dtype(self.trainer.precision))
            self.flops_model = FlopsModel(self.policy, peak, self.trainer.world_size) if (
                peak and self.detailed_metrics) else None
        for name in self.val_rewards:
            if name not in self.val_metrics:
                self.val_metrics[name] = MeanMetric(nan_strategy="ignore")  # NaN: a row the reward cannot score
        check_correct(self)  # validation's samples are judged by a score it has
        self.pipeline.each("setup", self.trainer, self, stage)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            # batches handed over past the run's last step are not trained: drop what has not
            # started (the checkpoints that keep the rows sampled ahead are written by now)
            self.rollouts.cancel()
        self.pipeline.each("teardown", self.trainer, self, stage)

    def configure_callbacks(self) -> list[L.Callback]:
        """What crosses the loop (the sample log, the guards), less what the trainer already
        holds; the batch's own work is :attr:`pipeline`'s."""
        return not_yet_held(self.loop_callbacks, attached_trainer(self))

    @property
    def max_new_tokens(self) -> int:
        """The longest greedy answer (and sampled response, unless sampling sets its own)."""
        return max_new_tokens(self._max_new_tokens, getattr(attached_trainer(self), "datamodule", None))

    @property
    def val_rewards(self) -> dict[str, Callable]:
        """{name: reward fn} scoring greedy validation answers."""
        return validation_rewards(self._val_rewards, getattr(attached_trainer(self), "datamodule", None))

    # --- training: one step, lightning_unified/step.py ----------------------------------
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        step.prepare_batch(self, batch, batch_idx)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        step.make_updates(self, optimizer, optimizer_closure)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """The one place where gradients flow (:func:`lightning_unified.step.update_loss`)."""
        return step.update_loss(self, batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        step.normalise_update(self)

    def on_fit_start(self) -> None:
        # a trainer.validate() before fit leaves the metrics' state as inference tensors,
        # which fit's no-grad validation cannot update in place; reset makes fresh ones
        for metric in self.val_metrics.values():
            metric.reset()
        self.pipeline.each("on_fit_start", self.trainer, self)

    def on_train_start(self) -> None:
        if self.policy_is_sharded():
            initialise_root(self.policy, self.device)  # before the loss calls the decoder alone
        self.rollouts.on_train_start(self.trainer, self)  # a checkpoint's batches sampled ahead go back
        self.pipeline.each("on_train_start", self.trainer, self)
        self.clock.start_clock()  # validation before fit is not training time

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Step 11's rollout part: a stale batch's lag, apart from the engine's mismatch
        (the stages' part ran in :class:`~lightning_unified.callbacks.stage_hooks.StagesAfterBatch`)."""
        self.rollouts.after_batch(self, outputs, batch)

    # --- validation: greedy answers from the rollout engine, awake for the whole epoch --------
    def on_validation_epoch_start(self) -> None:
        self._validation.enter_context(self.rollouts.engine_for(self.progress["optimizer_steps"]))

    def on_validation_epoch_end(self) -> None:
        self._validation.close()
        if self.clock.running:
            self.clock.start_clock()  # validation time is not training time

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        """Greedy answers to the held-out prompts, scored by each validation reward; with
        ``validation.num_samples``, sampled ones too (a reward model: its held-out pairs'
        accuracy and margin)."""
        if self.objective is not None:
            return self.objective.validate(self, batch)
        result = validate_batch(self, batch)
        if self.validation.enabled:
            validate_samples(self, batch, batch_idx)
        return result

    # --- checkpoints: LoRA keeps only its adapters; progress survives a resume ----------
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed into this module."""
        return fingerprint(f"data_source={type(self.data_source).__name__}, signal={type(self.signal).__name__}",
                           self.policy)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        write_run_state(checkpoint, self.progress, self.fingerprint(), self.policy)
        checkpoint["stages"] = self.pipeline.state_dict()
        checkpoint["rollouts"] = self.rollouts.state_dict()  # every rank's batches sampled ahead (a collective)
        checkpoint["failed_rows"] = self.failures.state_dict()

    def check_resumable(self, checkpoint: dict, trainer: L.Trainer | None = None) -> None:
        """Refuse a checkpoint from another model or another method, or one whose batches
        sampled ahead this run cannot take (another lag, or another number of processes than
        ``trainer``'s), naming the difference."""
        read_run_state(checkpoint, self.fingerprint())
        trainer = trainer if trainer is not None else attached_trainer(self)  # before fit: the caller's
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.rollouts.check_resumable(saved_rollouts(checkpoint), rank, world_size)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.progress.update(read_run_state(checkpoint, self.fingerprint()))
        self.pipeline.load_state_dict(checkpoint.get("stages", {}))
        self.rollouts.load_state_dict(saved_rollouts(checkpoint))  # this rank's batches sampled ahead
        self.failures.load_state_dict(checkpoint.get("failed_rows", {}))
        if is_lora(self.policy):
            self.strict_loading = False  # the frozen base weights come from model.path, not the checkpoint

    # --- optimisation and sharding --------------------------------------------------------
    def configure_optimizers(self):
        lost = half_precision_master(self.policy, self.trainer.precision)
        if lost:  # a named choice (model.dtype=bfloat16, bf16-true), said with its cost
            rank_zero_warn(lost)
        return configure_optimization(self.trained_modules(), self.optimizer_factory, self.scheduler_factory,
                                      self.trainer)

    def trained_modules(self) -> nn.Module:
        """What the optimizer steps: the policy, and an objective's own head when there is one."""
        return self.policy if self.objective is None else nn.ModuleList([self.policy, self.objective])

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2) shard the policy, with FSDP2's mixed precision
        under ``bf16-mixed``; others leave it alone."""
        if self.device_mesh is not None and not self.policy_is_sharded():
            shard_policy(self.policy, self.device_mesh["data_parallel"], precision=self.trainer.precision)
            if self.device.type == "cuda" and self.data_source.samples and self.data_source.sampling.engine == "hf":
                rank_zero_warn("data_source.sampling.engine=hf under FSDP2 generates with the sharded policy: every "
                               "token all-gathers every layer on every rank. data_source.sampling.engine=vllm samples "
                               "from a whole bf16 copy in each rank's engine instead (experiment=gpu_grpo)")

    def policy_is_sharded(self) -> bool:
        return is_sharded(self.policy)

    def save_pretrained(self, directory: str, merged_directory: str | None = None) -> None:
        """The policy and tokenizer as a Hugging Face directory (with LoRA: the adapter, plus a
        merged model in ``merged_directory`` if given). Call it on every rank: a sharded
        policy is gathered first (a collective), then rank 0 writes. A reward model writes an
        ``AutoModelForSequenceClassification`` directory instead (:mod:`lightning_unified.objectives`)."""
        writer = attached_trainer(self) is None or self.trainer.is_global_zero
        if self.objective is not None:
            self.objective.save(self, directory, merged_directory, writer=writer)
            return
        save_policy(self.policy, self.tokenizer, directory, merged_directory,
                    writer=attached_trainer(self) is None or self.trainer.is_global_zero)
