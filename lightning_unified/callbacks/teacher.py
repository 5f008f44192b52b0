"""Dense signal: a frozen teacher scores each batch's prompt + response once, and hands the
loss its hidden states and head (or a top-k, or one log-prob per token), never [B, R, V]."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.models.loading import (
    check_same_vocabulary,
    load_causal_lm,
    output_head,
    response_hidden,
)
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.data.chat import contextual_prompt, prompt_token_ids
from lightning_unified.data.collate import pad
from lightning_unified.data.teacher_cache import TeacherCache, teacher_id
from lightning_unified.losses.objective import TeacherLogits, target_logprobs, topk_logprobs
from lightning_unified.specs import Dense
from lightning_unified.teachers import build_teacher


log = logging.getLogger(__name__)


class TeacherCallback(L.Callback):
    """``signal.teacher`` is a model directory, or ``self``: the policy itself, in eval mode
    and under no_grad, with no second copy of its weights (self-distillation). With
    ``signal.teacher_context`` the teacher scores the responses after a prompt with
    privileged context (the reference answer, a demonstration) rather than the student's.
    ``signal.cache``: an offline teacher (scripts/cache_teacher.py), read by example
    index; no teacher is loaded. ``teacher.engine=vllm`` or ``server``: a served teacher
    (:mod:`lightning_unified.teachers`) returns log-probs instead. ``copy_head``: a
    self-teacher's output layer is copied, because with several updates per batch the
    policy's own layer changes before the last update reads the teacher."""

    def __init__(self, signal: Dense, copy_head: bool = False):
        self.signal = signal
        self.copy_head = copy_head
        self.teacher = None
        self.cache: TeacherCache | None = None
        self.served = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.signal.cache is not None:
            self._open_cache(trainer, pl_module)
            return
        if stage == "fit" and self.signal.served:
            if self.served is None:
                served = build_teacher(self.signal)
                served.start(pl_module.policy, pl_module.tokenizer)
                self.served = served
            return
        if stage == "fit" and self.teacher is None and not self.signal.is_self:
            teacher = load_causal_lm(self.signal.teacher, **self.signal.teacher_options)
            check_same_vocabulary(pl_module.policy, pl_module.tokenizer, teacher, self.signal.teacher,
                                  f"teacher {self.signal.teacher}")
            # kept out of the module so it is never trained, checkpointed or wrapped by DDP
            self.teacher = teacher.eval().requires_grad_(False)

    def _open_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The offline teacher, checked against this run's tokenizer, data and settings."""
        if self.cache is not None:
            return
        cache = TeacherCache(self.signal.cache)
        examples_of = getattr(trainer.datamodule, "training_examples", None) if trainer.datamodule else None
        if examples_of is None:
            log.warning("signal.cache: the data module has no training_examples(); the cache is checked example by "
                        "example (response lengths) but not as a whole dataset")
        cache.check(tokenizer=pl_module.tokenizer, examples=examples_of() if examples_of else None,
                    teacher=None if self.signal.teacher is None else teacher_id(self.signal.teacher), top_k=self.signal.top_k,
                    temperature=self.signal.temperature)
        self.cache = cache

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="teacher scoring")
        signal = self.signal
        if self.cache is not None:
            fields.require(batch, fields.EXAMPLE_INDEX, who="signal.cache (each row's example index)")
            k = signal.top_k or self.cache.top_k
            batch[fields.TEACHER_TOPK_IDS], batch[fields.TEACHER_TOPK_LOGP] = self.cache.rows(
                batch[fields.EXAMPLE_INDEX], batch[fields.RESPONSE_MASK], k)
            return
        prompt_ids, prompt_mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
        if signal.teacher_context:
            prompt_ids, prompt_mask = context_prompts(pl_module.tokenizer, batch, signal.teacher_context)
            prompt_ids, prompt_mask = prompt_ids.to(pl_module.device), prompt_mask.to(pl_module.device)
        if self.served is not None:
            scores = self.served.score(prompt_ids, prompt_mask, batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK],
                                       signal.top_k)
            if signal.top_k:
                batch[fields.TEACHER_TOPK_IDS] = scores.topk_ids.to(pl_module.device)
                batch[fields.TEACHER_TOPK_LOGP] = scores.topk_logp.to(pl_module.device)
            else:
                batch[fields.TEACHER_TOKEN_LOGP] = scores.token_logp.to(pl_module.device)
            return
        teacher = pl_module.policy if signal.is_self else self.teacher
        was_training = teacher.training
        teacher.eval()  # a self-teacher scores without dropout
        try:
            with torch.no_grad(), trainer_precision(pl_module):
                hidden = response_hidden(teacher, prompt_ids, prompt_mask, batch[fields.RESPONSE_IDS],
                                         batch[fields.RESPONSE_MASK])  # [B, R, H_t]
        finally:
            teacher.train(was_training)
        weight, bias = output_head(teacher)
        if signal.is_self:
            weight, bias = _frozen(weight, self.copy_head), _frozen(bias, self.copy_head)
        with torch.no_grad(), trainer_precision(pl_module):
            if signal.top_k:
                ids, logp = topk_logprobs(hidden, weight, signal.top_k, head_bias=bias, temperature=signal.temperature)
                batch[fields.TEACHER_TOPK_IDS], batch[fields.TEACHER_TOPK_LOGP] = ids, logp
            elif signal.divergence == "sampled_reverse_kl":
                batch[fields.TEACHER_TOKEN_LOGP] = target_logprobs(
                    hidden, weight, batch[fields.RESPONSE_IDS], head_bias=bias, temperature=signal.temperature
                )
            else:
                batch[fields.TEACHER] = TeacherLogits(
                    hidden=hidden, head_weight=weight, head_bias=bias, temperature=signal.temperature
                )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.served is not None:
            self.served.close()
            self.served = None


def _frozen(tensor: torch.Tensor | None, copy: bool) -> torch.Tensor | None:
    """The policy's own parameter as a teacher's: detached, and copied when it will change
    before the teacher is read. Under FSDP2 the parameter is a shard (a DTensor) outside
    the head's forward: it is gathered whole here (a collective every rank makes), which
    is a copy already."""
    if tensor is None:
        return None
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    return tensor.detach().clone() if copy else tensor.detach()


def context_prompts(tokenizer, batch: dict, template: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P'] left-padded ids and mask of every row's prompt with the teacher's context."""
    fields.require(batch, fields.PROMPTS, who="signal.teacher_context (the prompts as text)")
    prompts = batch[fields.PROMPTS]
    references = batch.get(fields.REFERENCES) or [None] * len(prompts)
    ids = [prompt_token_ids(tokenizer, contextual_prompt(p, template, {"reference": r}))
           for p, r in zip(prompts, references)]
    return pad(ids, tokenizer.pad_token_id, "left")
