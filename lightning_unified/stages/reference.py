"""A frozen reference scores each batch's responses once, for a KL penalty (k3 as a loss
term, or k1 in the reward), and ``train/kl_ref`` reports how far the policy has moved.
The reference is a model in the training process, or served (``reference.engine=vllm`` or
``server``): every estimator reads only its log-prob of each response token."""

from __future__ import annotations

import copy

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
import torch

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.failures import mark_failed, report
from lightning_unified.models.loading import check_same_vocabulary, load_model, load_tokenizer
from lightning_unified.models.forward import output_head, response_hidden
from lightning_unified.models.lora import adapters_disabled, is_lora
from lightning_unified.losses.objective import target_logprobs
from lightning_unified.losses.spans import span_sums
from lightning_unified.specs import Reference
from lightning_unified.teachers import build_teacher
from lightning_unified.teachers.alignment_pool import default_workers
from lightning_unified.teachers.tokenizers import TokenizerBridge
from lightning_unified.stages.base import Stage


class ReferenceStage(Stage):
    """``reference.path`` loads a model; without one the reference is the starting policy:
    with LoRA the same base model with its adapters switched off (no copy), otherwise a
    frozen copy taken before the first step. ``reference.engine=vllm`` or ``server``: the
    reference is served (:mod:`lightning_unified.teachers`), and no model is loaded here.
    ``reference.tokenizer=auto``: the reference has its own tokenizer; it scores each reply
    in its own tokens, and each span's log-prob lands on the span's last token, so the k1
    penalty's sum over the reply is exact (:mod:`lightning_unified.teachers.tokenizers`)."""

    name = "reference"

    def __init__(self, reference: Reference):
        super().__init__()
        self.reference = reference
        self.model = None
        self.served = None
        self.bridge: TokenizerBridge | None = None

    def reads(self) -> set[str]:
        return {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK}

    def writes(self) -> set[str]:
        across = {fields.REFERENCE_SPAN_ID, fields.FAILED}  # a sampled reply it cannot encode fails
        return {fields.REFERENCE_LOGP} | (across if self.reference.tokenizer == "auto" else set())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reference.tokenizer == "auto" and self.bridge is None:
            self.bridge = TokenizerBridge(
                pl_module.tokenizer, load_tokenizer(self.reference.path,
                                                    trust_remote_code=self.reference.model.trust_remote_code),
                unencodable_logp=self.reference.unencodable_logp, who="reference.tokenizer=auto",
                workers=(self.reference.alignment_workers if self.reference.alignment_workers is not None
                         else default_workers()))
        if self.reference.served:
            if stage == "fit" and self.served is None:
                self._start_served(pl_module)
            return
        # with LoRA and no path the reference is the policy's own base model: nothing to load
        if self.model is not None or (is_lora(pl_module.policy) and self.reference.path is None):
            return
        # FSDP2 shards the policy in configure_model, right after this hook, and a sharded
        # model cannot be copied: take the starting policy at the first setup, a
        # validation's included (it does not change the weights)
        sharding = isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy) and self.reference.path is None
        if stage != "fit" and not sharding:
            return
        if self.reference.path is not None:
            model = load_model(self.reference.model)
            if self.bridge is None:
                check_same_vocabulary(pl_module.policy, pl_module.tokenizer, model, self.reference.path,
                                  f"reference {self.reference.path}")
        else:
            if pl_module.policy_is_sharded():
                raise RuntimeError(
                    "the reference is the starting policy, but the policy was sharded (FSDP2) before this "
                    "stage saw it, and a sharded model cannot be copied; give reference.path (the "
                    "starting model's directory)")
            model = copy.deepcopy(pl_module.policy)
        # kept out of the module so it is never trained, checkpointed or wrapped by DDP; a
        # whole copy on every rank under FSDP2 too (scored without collectives)
        self.model = model.eval().requires_grad_(False)

    def _start_served(self, pl_module: L.LightningModule) -> None:
        # (a served model reports log-probs at temperature 1, as the loss's must be: the
        # rule served-reference-at-temperature-1 held when the module was built)
        served = build_teacher(self.reference.where, owner="reference", role="reference")
        if self.bridge is not None:  # checked against the reference's own tokenizer
            served.start(pl_module.policy, self.bridge.teacher, own_tokenizer=True)
        else:
            served.start(pl_module.policy, pl_module.tokenizer)
        self.served = served

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.served is not None:
            self.served.close()
            self.served = None
        if stage == "fit" and self.bridge is not None:
            self.bridge.close()  # its alignment workers (a later fit starts them again)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.model is not None:
            self.model.to(pl_module.device)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="reference scoring")
        with trainer_precision(pl_module):
            if self.bridge is not None:
                batch[fields.REFERENCE_LOGP], batch[fields.REFERENCE_SPAN_ID], failed = self.score_spans(pl_module,
                                                                                                         batch)
                if fields.is_sampled(batch):  # a sampled reply the reference cannot encode: a failed row, counted
                    mark_failed(batch, [f.row for f in failed])
                    report(pl_module, "reference", batch[fields.RESPONSE_IDS].shape[0], failed)
            else:
                batch[fields.REFERENCE_LOGP] = self.score(pl_module, batch)

    @torch.no_grad()
    def score_spans(self, pl_module: L.LightningModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
        """([B, R] each span's log-prob under the reference on its last student token, [B, R]
        each token's span, the sampled rows it cannot encode: 0 and no span): the reference
        reads the prompt and the reply in its own tokens."""
        rows = self.bridge.rows(batch, pl_module.device)
        logp = self.score_tokens(pl_module, rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.response_mask)
        spans = self.bridge.span_fields(rows, self.bridge.teacher_logp(rows, logp), batch[fields.RESPONSE_IDS].shape[1])
        span_id = spans[fields.SPAN_ID]
        on_ends = spans[fields.TEACHER_SPAN_LOGP].gather(1, span_id.clamp_min(0))
        return torch.where(spans[fields.SPAN_END].bool(), on_ends, 0.0), span_id, rows.failed

    def score(self, pl_module: L.LightningModule, batch: dict) -> torch.Tensor:
        """log pi_ref(y_t) [B, R] of the batch's response tokens, 0 on padding."""
        return self.score_tokens(pl_module, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                 batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK])

    @torch.no_grad()
    def score_tokens(self, pl_module: L.LightningModule, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """log pi_ref(y_t) [B, R] of these response tokens (the policy's, or the reference's
        own across tokenizers), 0 on padding."""
        inputs = (prompt_ids, prompt_mask, response_ids, response_mask)
        if self.served is not None:  # 0 on padding already
            return self.served.score(*inputs, top_k=0).token_logp.to(device=response_mask.device)
        if self.model is None:  # LoRA: the policy's own base model
            policy = pl_module.policy
            was_training = policy.training
            policy.eval()  # no adapter dropout: the reference is deterministic
            try:
                with adapters_disabled(policy):
                    hidden = response_hidden(policy, *inputs, packing=pl_module.packing)
            finally:
                policy.train(was_training)
            weight, bias = output_head(policy)
        else:
            hidden = response_hidden(self.model, *inputs, packing=pl_module.packing)
            weight, bias = output_head(self.model)
        logp = target_logprobs(hidden, weight, response_ids, head_bias=bias, temperature=pl_module.temperature)
        return torch.where(response_mask.bool(), logp, 0.0)

    def after_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "target_logp" not in outputs or fields.REFERENCE_LOGP not in batch:
            return
        mask = fields.loss_mask(batch).bool()
        # the k3 estimate of KL(policy || reference) per token (per span across tokenizers):
        # non-negative, low variance
        log_r = (batch[fields.REFERENCE_LOGP] - outputs["target_logp"])[mask].float()
        if fields.REFERENCE_SPAN_ID in batch:
            span_id = batch[fields.REFERENCE_SPAN_ID]
            policy = span_sums(outputs["target_logp"].float(), span_id)  # [B, S<=R]
            reference = span_sums(batch[fields.REFERENCE_LOGP].float(), span_id)
            held = span_sums((span_id >= 0).float(), span_id) > 0
            log_r = (reference - policy)[held]
        kl = (log_r.exp() - log_r - 1).mean() if log_r.numel() else log_r.new_zeros(())
        pl_module.log("train/kl_ref", kl, prog_bar=True, batch_size=int(mask.sum()))
