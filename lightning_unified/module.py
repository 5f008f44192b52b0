"""UnifiedModule: the policy forward, the weights from the batch's fields, the one loss.

SFT, distillation, RL and on-policy distillation are the same ``training_step``; what
differs is the batch the pipeline (:mod:`lightning_unified.pipeline`) hands it, and the
weight builder :mod:`lightning_unified.weighting` picks from its fields.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_unified import batch as fields
from lightning_unified.losses.aggregation import (
    AGGREGATIONS,
    LossCounts,
    all_reduce_sum,
    loss_counts,
    normaliser,
    token_terms,
)
from lightning_unified.models.loss_head import install_loss_head
from lightning_unified.models.loading import (
    check_vocabulary,
    load_causal_lm,
    response_hidden,
)
from lightning_unified.pipeline import build_pipeline
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Sparse
from lightning_unified.weighting import builder_fields, select_weight_fn
from lightning_unified.losses.weights import WeightSum


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does. Lightning registers this only
    for NCCL; a gloo group left to interpreter shutdown (ddp_spawn workers exit through
    sys.exit) can abort with "terminate called without an active exception"."""
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _EXIT_HOOK_REGISTERED = True


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_EXIT_HOOK_REGISTERED = False


class UnifiedModule(L.LightningModule):
    """One LightningModule for every (data_source, signal) pair.

    ``policy`` is a Hugging Face causal LM or a local path to one; ``optimizer`` is a
    partial taking the parameters (default ``functools.partial(torch.optim.AdamW, lr=1e-3)``);
    ``scheduler`` a partial taking the optimizer, stepped every optimizer step.
    ``aggregation`` is the loss normaliser (:data:`lightning_unified.losses.aggregation.AGGREGATIONS`),
    counted over the whole optimizer step: every accumulated micro-batch on every rank. ``max_new_tokens`` bounds greedy validation and, unless the sampling
    spec says otherwise, sampling; None takes the datamodule's ``max_new_tokens``.
    """

    def __init__(
        self,
        policy: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | str,
        data_source: OffPolicy | OnPolicy,
        signal: Sparse | Dense,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        *,
        aggregation: str = "token_mean",
        constant_normaliser: float | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        max_new_tokens: int | None = None,
    ):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.policy = load_causal_lm(policy) if isinstance(policy, str) else policy
        if not isinstance(self.policy, nn.Module):
            raise TypeError(f"policy must be a Hugging Face causal LM or a path to one, got {type(policy).__name__}")
        check_vocabulary(self.policy, self.tokenizer, "policy")
        self.policy.train()  # from_pretrained returns eval mode; Lightning toggles it from here on
        install_loss_head(self.policy)  # the loss runs inside the head's forward (FSDP2 needs that)
        self.data_source = data_source
        self.signal = signal
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.aggregation = aggregation
        self.constant_normaliser = constant_normaliser
        self.temperature = temperature
        self.chunk_size = chunk_size
        self._max_new_tokens = max_new_tokens
        self.val_exact_match = MeanMetric()
        # [surrogate, objective, tokens, sequences] summed over this optimizer step's
        # micro-batches on this rank; reset at the step
        self._step_sums: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        _destroy_process_group_at_exit()

    # --- the pipeline -------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        return build_pipeline(self.data_source, self.signal)

    @property
    def max_new_tokens(self) -> int:
        if self._max_new_tokens is not None:
            return self._max_new_tokens
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        value = getattr(datamodule, "max_new_tokens", None)
        if value is None:
            raise ValueError("UnifiedModule needs max_new_tokens (the datamodule has no max_new_tokens)")
        return value

    # --- training -----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="training_step")
        mask = batch[fields.RESPONSE_MASK]
        # Each micro-batch contributes its SUM of per-token terms; on_before_optimizer_step
        # divides the gradient by the normaliser of the whole optimizer step (every
        # micro-batch, every rank), which is known only once the step's last micro-batch has
        # run. So any split into micro-batches and ranks gives the gradient of the whole batch.
        importance = self.data_source.importance if self.data_source.samples else None
        weight_fn = WeightSum((select_weight_fn(batch, self.signal, importance),))
        hidden = response_hidden(self.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                 batch[fields.RESPONSE_IDS], mask)
        out = self.policy.get_output_embeddings()(hidden, loss_inputs={
            "targets": batch[fields.RESPONSE_IDS],
            "token_scale": token_terms(mask, self.aggregation, constant=self.constant_normaliser),
            "weight_fn": weight_fn, "fields": builder_fields(batch), "teacher": batch.get(fields.TEACHER),
            "temperature": self.temperature, "chunk_size": self.chunk_size,
        })
        counts = loss_counts(mask)
        # [surrogate, objective, tokens, sequences] of this step so far, on this rank
        sums = torch.stack([out.loss.detach().double(), out.objective.double(),
                            out.loss.new_tensor(counts.tokens, dtype=torch.float64),
                            out.loss.new_tensor(counts.sequences, dtype=torch.float64)])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        self.log("train/response_tokens", mask.sum().float(), batch_size=mask.shape[0])
        # Lightning divides the loss by accumulate_grad_batches; the step's normaliser replaces that
        return {"loss": out.loss * self.trainer.accumulate_grad_batches, "target_logp": out.target_logp.detach()}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Divide the summed gradient by the whole step's normaliser, and log the step's
        loss and objective with the same normaliser (one all-reduce per step). DDP and FSDP
        average gradients over ranks, so the factor carries the world size; gradient
        clipping runs after this hook, on the normalised gradient."""
        if self._step_sums is None:
            return
        total = all_reduce_sum(self._step_sums)
        self._step_sums = None
        norm = normaliser(self.aggregation, LossCounts(tokens=float(total[2]), sequences=float(total[3])))
        factor = self.trainer.world_size / norm
        for param in self.policy.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)
        self.log("train/loss", (total[0] / norm).float(), prog_bar=True, batch_size=1)
        self.log("train/objective", (total[1] / norm).float(), batch_size=1)

    # --- validation: greedy exact match -------------------------------------------------
    @torch.no_grad()
    def generate_greedy(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        sequences = self.policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            synced_gpus=self.trainer.world_size > 1 if self._trainer is not None else False,
        )
        return self.tokenizer.batch_decode(sequences[:, prompt_ids.shape[1]:], skip_special_tokens=True)

    def on_fit_start(self) -> None:
        # a trainer.validate() before fit leaves the metric's state as inference tensors,
        # which fit's no-grad validation cannot update in place; reset makes fresh ones
        self.val_exact_match.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.REFERENCES, who="validation_step")
        completions = self.generate_greedy(batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK])
        correct = torch.tensor([float(c.strip() == r) for c, r in zip(completions, batch[fields.REFERENCES])],
                               device=self.device)
        self.val_exact_match.update(correct)
        self.log("val/exact_match", self.val_exact_match, prog_bar=True, batch_size=correct.numel())

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.policy.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2), shard each decoder layer, the embeddings and
        the loss head as their own units; other strategies leave the model alone."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or self.policy_is_sharded():
            return
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"]
        # the blocks Hugging Face never splits across devices (decoder layers) are the units
        blocks = set(getattr(self.policy, "_no_split_modules", None) or [])
        for module in self.policy.base_model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.policy.base_model, mesh=mesh)
        fully_shard(self.policy.get_output_embeddings(), mesh=mesh)
        fully_shard(self.policy, mesh=mesh)

    def policy_is_sharded(self) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.policy.parameters())

    def save_pretrained(self, directory: str) -> None:
        """The policy and tokenizer as a Hugging Face directory (``from_pretrained`` loads it).
        Call it on every rank: a sharded policy is gathered first (a collective), then
        rank 0 writes."""
        state_dict = None
        if self.policy_is_sharded():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state_dict = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        if self._trainer is None or self.trainer.is_global_zero:
            self.policy.save_pretrained(directory, state_dict=state_dict)
            self.tokenizer.save_pretrained(directory)
