"""The teacher stage (dense signal): a frozen teacher (or several, each row scored by the one its data names)
scores each batch's prompt + response once, and hands the loss its hidden states and head
(or a top-k, or one log-prob per token), never [B, R, V]."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from lightning_unified import batch as fields
from lightning_unified.models.loading import check_same_vocabulary, load_model
from lightning_unified.models.forward import output_head, response_hidden
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.data.chat import contextual_prompt, prompt_token_ids
from lightning_unified.data.collate import pad
from lightning_unified.data.teacher_cache import TeacherCache, teacher_id
from lightning_unified.failures import mark_failed, report
from lightning_unified.losses.objective import TeacherLogits, target_logprobs, topk_logprobs
from lightning_unified.models.snapshot import WeightSnapshot
from lightning_unified.specs import Dense
from lightning_unified.teachers import build_teacher
from lightning_unified.teachers.routing import joined_rows, route_index
from lightning_unified.stages.base import Stage
from lightning_unified.stages.teacher_spans import SpanTeacher


log = logging.getLogger(__name__)


class TeacherStage(Stage):
    """``signal.teacher`` is a model directory, or ``self``: the policy itself, in eval mode
    and under no_grad, with no second copy of its weights (self-distillation). With
    ``signal.teacher_context`` the teacher scores the responses after a prompt with
    privileged context (the reference answer, a demonstration) rather than the student's.
    ``signal.cache``: an offline teacher (scripts/cache_teacher.py), read by example
    index; no teacher is loaded. ``teacher.engine=vllm`` or ``server``: a served teacher
    (:mod:`lightning_unified.teachers`) returns log-probs instead. ``signal.teachers``:
    several teachers, each row scored by the one its data names (:mod:`routing`), and
    ``teacher_index`` says which. ``copy_head``: a self-teacher's output layer is copied,
    because with several updates per batch the policy's own layer changes before the last
    update reads the teacher. ``signal.self_teacher`` other than ``live``: the self-teacher
    scores with a :class:`~lightning_unified.models.snapshot.WeightSnapshot` of the policy's
    weights (frozen, averaged or refreshed), swapped in for its forward. ``signal.teacher=self``
    with ``teacher.engine=vllm``: the run's own vLLM rollout engine scores the context prompt
    (its top-k or each token's log-prob), with the weights it samples with.

    ``signal.teacher_tokenizer=auto``: the teacher has its own tokenizer, and
    :class:`~lightning_unified.stages.teacher_spans.SpanTeacher` does this stage's work span by span;
    a sampled reply it cannot encode is a failed row (``teacher/unencodable``)."""

    name = "teacher"

    def __init__(self, signal: Dense, copy_head: bool = False):
        super().__init__()
        self.signal = signal
        self.copy_head = copy_head
        # by name: Hugging Face teachers (engine=hf) and served ones (vllm, server)
        self.models: dict[str, torch.nn.Module] = {}
        self.served: dict = {}
        self.cache: TeacherCache | None = None
        self_teacher = signal.teacher if signal.is_self else None
        self.snapshot = (WeightSnapshot(self_teacher.weights, self_teacher.decay, self_teacher.every)
                         if self_teacher is not None and self_teacher.weights != "live" else None)
        # a teacher with its own tokenizer (signal.teacher_tokenizer=auto)
        self.spans: SpanTeacher | None = None

    def reads(self) -> set[str]:
        out = {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK}
        # a teacher with its own tokenizer reads the prompts as text, in its own format
        return out | ({fields.PROMPTS} if self.signal.across_tokenizers else set())

    def writes(self) -> set[str]:
        """The teacher's fields in the form the signal asks for: its top-k (a cache, or
        ``top_k``), its log-prob of each token (the sampled reverse KL, or a served teacher
        without ``top_k``), or its hidden states and head (the whole distribution)."""
        spans = {fields.SPAN_ID, fields.SPAN_END}
        out = {"top_k": {fields.TEACHER_TOPK_IDS, fields.TEACHER_TOPK_LOGP}, "token_logp": {fields.TEACHER_TOKEN_LOGP},
               "distribution": {fields.TEACHER},
               "spans": spans | {fields.TEACHER_SPAN_LOGP, fields.SPAN_LOG_RATIO, fields.SPAN_SHARE},
               "span_top_k": spans | {fields.TEACHER_SPAN_TOPK_IDS, fields.TEACHER_SPAN_TOPK_LOGP,
                                      fields.SPAN_PREFIX_LOGP, fields.SPAN_PREFIX_GRAD, fields.VOCABULARY_MATCH},
               }[self.signal.teacher_gives]
        out = out | ({fields.FAILED} if self.signal.across_tokenizers else set())
        return out | ({fields.TEACHER_INDEX} if self.signal.routed else set())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.signal.cached:
            self._open_cache(trainer, pl_module)
            return
        self._check_data_names(trainer)
        single = not self.signal.routed
        for name, spec in self.signal.teachers.items():
            label = f"teacher {spec.describe()}" if single else f"teacher {name!r} ({spec.describe()})"
            tokenizer = pl_module.tokenizer
            if self.signal.across_tokenizers:
                if self.spans is None:
                    self.spans = SpanTeacher(self.signal, pl_module.tokenizer, spec)
                tokenizer = self.spans.bridge.teacher
            if spec.served and name not in self.served:
                served = build_teacher(spec, owner="teacher" if single else f"signal.teachers.{name}")
                # across tokenizers the served model is checked against the teacher's own tokenizer
                served.start(pl_module.policy, tokenizer, own_tokenizer=self.signal.across_tokenizers)
                self.served[name] = served
            elif not spec.served and name not in self.models:
                teacher = load_model(spec.model)
                if not self.signal.across_tokenizers:
                    check_same_vocabulary(pl_module.policy, pl_module.tokenizer, teacher, spec.model.path, label)
                # kept out of the module so it is never trained, checkpointed or wrapped by DDP
                self.models[name] = teacher.eval().requires_grad_(False)

    def _check_data_names(self, trainer: L.Trainer) -> None:
        """The teachers the training data names are the ones there are: each unknown name is
        named with where the data first gives it; data that names teachers for a run of one
        teacher is refused rather than scored by that one."""
        datamodule = getattr(trainer, "datamodule", None)
        names_of = getattr(datamodule, "teacher_names", None)
        seen = names_of() if names_of else {}
        if not seen:
            return
        if not self.signal.routed:
            name, where = next(iter(seen.items()))
            raise ValueError(f"{where}: the training data names each example's teacher (column 'teacher', here "
                             f"{name!r}), but this run has one teacher; give the teachers by name "
                             f"(signal.teachers={{{name}: {{path: DIR}}, ...}}), or set task.columns.teacher=null")
        for name, where in seen.items():
            if name not in self.signal.teachers:
                raise ValueError(f"{where}: teacher {name!r} is not one of signal.teachers "
                                 f"{list(self.signal.teachers)}")

    def _open_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The offline teacher, checked against this run's tokenizer, data and settings."""
        if self.cache is not None:
            return
        made_by = self.signal.teacher.made_by  # the teacher the run names beside its cache
        cache = TeacherCache(self.signal.teacher.directory)
        examples_of = getattr(trainer.datamodule, "training_examples", None) if trainer.datamodule else None
        if examples_of is None:
            log.warning("signal.cache: the data module has no training_examples(); the cache is checked example by "
                        "example (response lengths) but not as a whole dataset")
        cache.check(tokenizer=pl_module.tokenizer, examples=examples_of() if examples_of else None,
                    teacher=None if made_by is None else teacher_id(made_by), top_k=self.signal.top_k,
                    temperature=self.signal.temperature)
        self.cache = cache

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for teacher in self.models.values():
            teacher.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.snapshot is None:
            return
        # (not under FSDP2: the rule self-teacher-copy-unsharded held at setup)
        self.snapshot.take(pl_module.policy)  # the starting policy, or the checkpoint's snapshot

    def after_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        if self.snapshot is not None:
            self.snapshot.follow(pl_module.policy, pl_module.progress["optimizer_steps"])

    def state_dict(self) -> dict:
        return {"snapshot": self.snapshot.state_dict()} if self.snapshot is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.snapshot is not None:
            if "snapshot" not in state_dict:
                raise ValueError(f"signal.self_teacher={self.signal.teacher.weights}: the checkpoint holds no self-teacher "
                                 f"weights (it was written with signal.self_teacher=live)")
            self.snapshot.load_state_dict(state_dict["snapshot"])

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="teacher scoring")
        signal = self.signal
        if self.cache is not None:
            fields.require(batch, fields.EXAMPLE_INDEX, who="signal.cache (each row's example index)")
            k = signal.top_k or self.cache.top_k
            batch[fields.TEACHER_TOPK_IDS], batch[fields.TEACHER_TOPK_LOGP] = self.cache.rows(
                batch[fields.EXAMPLE_INDEX], batch[fields.RESPONSE_MASK], k)
            return
        if self.spans is not None:
            served = next(iter(self.served.values()), None)
            out, failed = self.spans.fields(pl_module, batch, None if served else next(iter(self.models.values())),
                                            served)
            batch.update(out)
            if fields.is_sampled(batch):  # a sampled reply the teacher cannot encode: a failed row, counted
                mark_failed(batch, [f.row for f in failed])
                report(pl_module, "teacher", batch[fields.RESPONSE_IDS].shape[0], failed)
            return
        prompt_ids, prompt_mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
        if signal.teacher_context:
            prompt_ids, prompt_mask = context_prompts(pl_module.tokenizer, batch, signal.teacher_context)
            prompt_ids, prompt_mask = prompt_ids.to(pl_module.device), prompt_mask.to(pl_module.device)
        tensors = (prompt_ids, prompt_mask, batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK])
        if signal.is_self and signal.teacher.served:
            # the policy's own rollout engine, synced as sampling syncs it, scores the context prompt
            with pl_module.rollouts.engine_for(pl_module.progress["optimizer_steps"]) as engine:
                batch.update(self._served_fields(pl_module, engine.score(*tensors, signal.top_k)))
            return
        if signal.is_self:
            if self.snapshot is None:
                batch.update(self._hidden_state_fields(pl_module, pl_module.policy, *tensors, copy_head=self.copy_head))
            else:  # the head is copied: the policy's own returns when the snapshot is swapped out
                with self.snapshot.swapped_in(pl_module.policy):
                    batch.update(self._hidden_state_fields(pl_module, pl_module.policy, *tensors, copy_head=True))
            return
        names = list(signal.teachers)
        if not signal.routed:
            batch.update(self._score(pl_module, names[0], *tensors))
            return
        fields.require(batch, fields.TEACHER_NAMES, who=f"signal.teachers {names} (each row's teacher, from the "
                                                        f"data's teacher column: task.columns.teacher=COLUMN)")
        index = route_index(batch[fields.TEACHER_NAMES], names, device=prompt_ids.device)
        parts = []
        for position, name in enumerate(names):
            rows = (index == position).nonzero().squeeze(-1)
            if rows.numel():
                parts.append((rows, self._score(pl_module, name, *(t.index_select(0, rows) for t in tensors))))
        batch.update(joined_rows(parts, index.shape[0]))
        batch[fields.TEACHER_INDEX] = index

    def on_update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> None:
        """Across tokenizers, before each update: the spans' weights from the policy as it is now."""
        if self.spans is not None:
            self.spans.before_update(pl_module, batch)

    def _score(self, pl_module: L.LightningModule, name: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict:
        """The batch fields teacher ``name`` gives these rows."""
        if name in self.served:
            return self._served_fields(pl_module, self.served[name].score(prompt_ids, prompt_mask, response_ids,
                                                                          response_mask, self.signal.top_k))
        return self._hidden_state_fields(pl_module, self.models[name], prompt_ids, prompt_mask, response_ids,
                                         response_mask)

    def _served_fields(self, pl_module: L.LightningModule, scores) -> dict:
        """The batch fields of a teacher that answers with log-probs: its top-k, or its
        log-prob of each token."""
        if self.signal.teacher_gives == "top_k":
            return {fields.TEACHER_TOPK_IDS: scores.topk_ids.to(pl_module.device),
                    fields.TEACHER_TOPK_LOGP: scores.topk_logp.to(pl_module.device)}
        return {fields.TEACHER_TOKEN_LOGP: scores.token_logp.to(pl_module.device)}

    def _hidden_state_fields(self, pl_module: L.LightningModule, teacher: torch.nn.Module, prompt_ids: torch.Tensor,
                             prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                             copy_head: bool = False) -> dict:
        """The fields of a teacher in this process (a Hugging Face model, or the policy
        itself): its hidden states and head, its top-k, or its log-prob of each token."""
        signal = self.signal
        was_training = teacher.training
        if was_training:  # a self-teacher scores without dropout (a frozen teacher is in eval mode already)
            teacher.eval()
        try:
            with torch.no_grad(), trainer_precision(pl_module):
                hidden = response_hidden(teacher, prompt_ids, prompt_mask, response_ids, response_mask,
                                         packing=pl_module.packing)  # [B, R, H_t]
        finally:
            if was_training:
                teacher.train()
        weight, bias = output_head(teacher)
        if signal.is_self:
            weight, bias = _frozen(weight, copy_head), _frozen(bias, copy_head)
        with torch.no_grad(), trainer_precision(pl_module):
            # what the divergence needs (lightning_unified.registry), or the top-k signal.top_k asks for
            if signal.teacher_gives == "top_k":
                ids, logp = topk_logprobs(hidden, weight, signal.top_k, head_bias=bias, temperature=signal.temperature)
                return {fields.TEACHER_TOPK_IDS: ids, fields.TEACHER_TOPK_LOGP: logp}
            if signal.teacher_gives == "token_logp":
                return {fields.TEACHER_TOKEN_LOGP: target_logprobs(hidden, weight, response_ids, head_bias=bias,
                                                                   temperature=signal.temperature)}
            return {fields.TEACHER: TeacherLogits(hidden=hidden, head_weight=weight, head_bias=bias,
                                                  temperature=signal.temperature)}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            for served in self.served.values():
                served.close()
            self.served = {}
            if self.spans is not None:
                self.spans.bridge.close()  # its alignment workers (a later fit starts them again)


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
    teacher_prompts = batch.get(fields.TEACHER_PROMPTS) or [None] * len(prompts)
    ids = [prompt_token_ids(tokenizer, contextual_prompt(p, template, {"reference": r, "teacher_prompt": t}))
           for p, r, t in zip(prompts, references, teacher_prompts)]
    return pad(ids, tokenizer.pad_token_id, "left")
