"""The teacher stage's work for a teacher with its own tokenizer
(``signal.teacher_tokenizer=auto``): the teacher scores each reply in its own tokens after
its own prompt (:mod:`lightning_unified.teachers.tokenizers`), its scores come back onto the
student's tokens span by span, and before every update the policy's own span terms are
read from one no-grad forward of the policy as it is then, because a span's weight depends
on all of its tokens' log-probs at once."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.losses.objective import target_logprobs, topk_logprobs
from lightning_unified.losses.spans import span_log_ratio, span_prefix_fields
from lightning_unified.losses.teacher_logits import TeacherLogits
from lightning_unified.models.forward import output_head, response_hidden
from lightning_unified.models.loading import load_tokenizer
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.specs import Dense, ServerTeacher, TeacherEntry
from lightning_unified.teachers.alignment_pool import default_workers
from lightning_unified.teachers.tokenizers import TokenizerBridge, vocabulary_match

log = logging.getLogger(__name__)


class SpanTeacher:
    """One teacher with its own tokenizer (``spec``): the bridge to the student's tokens
    and, for ``uld_hybrid``, the tokens both vocabularies share."""

    def __init__(self, signal: Dense, student_tokenizer, spec: TeacherEntry):
        self.signal = signal
        # a served teacher's tokenizer is read from its local directory (teacher.path)
        ref = spec.tokenizer if isinstance(spec, ServerTeacher) else spec.model
        teacher_tokenizer = load_tokenizer(ref.path, trust_remote_code=ref.trust_remote_code)
        workers = signal.alignment_workers if signal.alignment_workers is not None else default_workers()
        self.bridge = TokenizerBridge(student_tokenizer, teacher_tokenizer, unencodable_logp=signal.unencodable_logp,
                                      context=signal.teacher_context, workers=workers)
        self.match = None
        if signal.divergence == "uld_hybrid":
            self.match = vocabulary_match(student_tokenizer, teacher_tokenizer, signal.hybrid_matched_weight)
            log.info("signal.divergence=uld_hybrid: %d of the teacher's %d tokens have a twin in the student's "
                     "vocabulary; the matched part's weight is %.4f", int((self.match.teacher_to_student >= 0).sum()),
                     self.match.teacher_to_student.numel(), self.match.matched_weight)

    def fields(self, pl_module: L.LightningModule, batch: dict, teacher: torch.nn.Module | None,
               served) -> tuple[dict, list]:
        """The span fields: the teacher (a model in this process, or ``served``) reads its own
        prompt and its own tokens of each reply; and the sampled rows it cannot encode (no
        span: their fields hold no weight, and the stage marks them failed)."""
        signal, bridge = self.signal, self.bridge
        rows = bridge.rows(batch, pl_module.device)
        tensors = (rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.response_mask)
        top_k = 0
        if signal.teacher_gives == "span_top_k":
            top_k = signal.top_k or len(bridge.teacher)  # the teacher's whole vocabulary, sorted, by default
        topk_ids = topk_logp = None
        if served is not None:
            scores = served.score(*tensors, top_k)
            token_logp, topk_ids, topk_logp = scores.token_logp.to(pl_module.device), scores.topk_ids, scores.topk_logp
        else:
            with torch.no_grad(), trainer_precision(pl_module):
                hidden = response_hidden(teacher, *tensors, packing=pl_module.packing)  # [B, R_t, H_t]
                weight, bias = output_head(teacher)
                token_logp = target_logprobs(hidden, weight, rows.response_ids, head_bias=bias,
                                             temperature=signal.temperature)
                if top_k:
                    topk_ids, topk_logp = topk_logprobs(hidden, weight, min(top_k, weight.shape[0]), head_bias=bias,
                                                        temperature=signal.temperature)
        teacher_logp = bridge.teacher_logp(rows, token_logp)
        width = batch[fields.RESPONSE_IDS].shape[1]
        out = bridge.span_fields(rows, teacher_logp, width)
        if top_k:
            out |= bridge.span_topk_fields(rows, teacher_logp, topk_ids.to(pl_module.device),
                                           topk_logp.to(pl_module.device), width, self.match)
            if self.match is not None:
                out[fields.VOCABULARY_MATCH] = self.match
        return out, rows.failed

    def before_update(self, pl_module: L.LightningModule, batch: dict) -> None:
        """The spans' weights from the policy's log-probs as they are now."""
        if fields.SPAN_ID not in batch:
            return
        inputs = (batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK], batch[fields.RESPONSE_IDS],
                  batch[fields.RESPONSE_MASK])
        if self.signal.teacher_gives == "spans":
            with torch.no_grad():
                logp = response_logprobs(pl_module.policy, *inputs, temperature=pl_module.temperature,
                                         packing=pl_module.packing)  # [B, R]
            batch[fields.SPAN_LOG_RATIO], batch[fields.SPAN_SHARE] = span_log_ratio(
                logp, batch[fields.TEACHER_SPAN_LOGP], batch[fields.SPAN_ID])
            return
        batch.update(self._prefix_fields(pl_module, batch, inputs))

    def _prefix_fields(self, pl_module: L.LightningModule, batch: dict, inputs: tuple) -> dict:
        """{span_prefix_logp, span_prefix_grad} for ULD and the hybrid: the policy's log-prob
        of each span's earlier tokens (on the span's end), and the span's objective's
        derivative with respect to it (on those earlier tokens)."""
        policy = pl_module.policy
        ends = batch[fields.SPAN_END].bool()
        with torch.no_grad(), trainer_precision(pl_module):
            hidden = response_hidden(policy, *inputs, packing=pl_module.packing)  # [B, R, H]
            # under FSDP2 the head is a shard outside its forward: gathered whole (every rank does)
            weight, bias = (t.full_tensor() if isinstance(t, DTensor) else t for t in output_head(policy))
            logp = target_logprobs(hidden, weight, batch[fields.RESPONSE_IDS], head_bias=bias,
                                   temperature=pl_module.temperature, chunk_size=pl_module.chunk_size)
            logp = torch.where(batch[fields.RESPONSE_MASK].bool(), logp, 0.0)  # [B, R]
            # the policy's distribution at the span ends, made a chunk of ends at a time, in float32
            at_ends = TeacherLogits(hidden=hidden[ends].float(), head_weight=weight.float(),
                                    head_bias=None if bias is None else bias.float(), temperature=pl_module.temperature)
            prefix, prefix_grad = span_prefix_fields(
                logp, at_ends, batch[fields.SPAN_ID], ends, batch[fields.TEACHER_SPAN_TOPK_IDS],
                batch[fields.TEACHER_SPAN_TOPK_LOGP], self.match, self.signal.beta, chunk_size=pl_module.chunk_size)
        return {fields.SPAN_PREFIX_LOGP: prefix, fields.SPAN_PREFIX_GRAD: prefix_grad}
