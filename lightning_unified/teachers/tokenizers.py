"""A teacher with another tokenizer than the student's (``signal.teacher_tokenizer=auto``;
``reference.tokenizer=auto`` for the KL penalty's reference).

Each row's reply is decoded once from the student's ids and encoded with the teacher's
tokenizer; the two tokenizations are cut into spans at the characters where both have a
boundary (:func:`lightning_unified.data.alignment.align_reply`). The teacher reads its own
prompt (the data's prompt in its own chat format, or ``signal.teacher_context`` rendered
for it) followed by its own tokens of the reply, and what it says is brought back onto the
student's tokens span by span:

- its log-probability of each span (the sum over its tokens), for the sampled reverse KL
  and the k1 penalty, which are exact span by span;
- its distribution after each span's prefix, times the prefix's probability (its top-k of
  those continuations), on the span's last student token, for ULD and the GOLD-style hybrid.

A teacher token standing for characters the teacher cannot encode is refused, naming them,
unless ``signal.unencodable_logp`` gives the log-prob such a token gets. Refused how depends
on who wrote the reply: a sampled reply the teacher cannot encode is a failed row (left out
of the loss, counted in ``teacher/unencodable``: the policy may write anything), while the
data's own response is a data error, raised naming the example (the data will not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_unified import batch as fields
from lightning_unified.data.alignment import Alignment, AlignmentError, align_reply
from lightning_unified.data.chat import contextual_prompt, end_of_turn_id, is_chat, prompt_token_ids, stop_token_ids
from lightning_unified.data.collate import pad
from lightning_unified.failures import RowFailure, row_failure
from lightning_unified.teachers.alignment_pool import AlignmentPool
from lightning_unified.losses.spans import span_ends, span_ids, span_sums
from lightning_unified.losses.uld import VocabularyMatch


# the log-prob of a top-k slot with no token in it (exp is exactly 0 in float32 and float64)
NO_ENTRY_LOGP = -1.0e4


@dataclass
class TeacherRows:
    """The batch's rows in the teacher's tokens: its prompts (left-padded) and its tokens of
    each reply (right-padded), with each row's alignment to the student's tokens."""

    prompt_ids: Tensor  # [B, P_t] long
    prompt_mask: Tensor  # [B, P_t] long
    response_ids: Tensor  # [B, R_t] long
    response_mask: Tensor  # [B, R_t] long
    alignments: list[Alignment]
    unknown: Tensor  # [B, R_t] bool: the teacher's unknown token, standing for characters it cannot encode
    # sampled replies the teacher cannot encode: each row's teacher reply is then its end of turn alone, with no span
    failed: list[RowFailure]


def vocabulary_match(student_tokenizer, teacher_tokenizer, matched_weight: float | None = None) -> VocabularyMatch:
    """Tokens whose vocabulary strings are equal in both tokenizers (GOLD's rule); the
    matched part's weight is ``matched_weight``, or by default (GOLD's adaptive one) the
    matched share of the teacher's vocabulary."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    student_size = max(len(student_tokenizer), max(student_vocab.values()) + 1)
    teacher_size = max(len(teacher_tokenizer), max(teacher_vocab.values()) + 1)
    student_matched = torch.zeros(student_size, dtype=torch.bool)
    teacher_to_student = torch.full((teacher_size,), -1, dtype=torch.long)
    for token, teacher_id in teacher_vocab.items():
        student_id = student_vocab.get(token)
        if student_id is not None:
            teacher_to_student[teacher_id] = student_id
            student_matched[student_id] = True
    if matched_weight is None:
        matched_weight = float((teacher_to_student >= 0).sum()) / teacher_size
    return VocabularyMatch(student_matched, teacher_to_student, matched_weight, 1.0 - matched_weight)


def teacher_prompt_ids(teacher_tokenizer, prompt, context: str | None, columns: dict, who: str) -> list[int]:
    """The teacher's prompt in its own format: ``context`` (``signal.teacher_context``)
    rendered over the example's columns, or the data's prompt; a chat prompt goes through
    the teacher's chat template, and a teacher without one reads the rendered text as it
    is (its own plain format)."""
    has_template = bool(getattr(teacher_tokenizer, "chat_template", None))
    if context is None:
        if is_chat(prompt) and not has_template:
            raise ValueError(f"{who}: the prompt is a list of chat messages, and the teacher's tokenizer "
                             f"{teacher_tokenizer.name_or_path!r} has no chat template; give its own prompt format "
                             f"with signal.teacher_context (e.g. '{{teacher_prompt}}', a column of the data)")
        return prompt_token_ids(teacher_tokenizer, prompt)
    rendered = contextual_prompt(prompt, context, columns)
    if is_chat(rendered) and not has_template:
        rendered = contextual_prompt(_last_user_text(prompt), context, columns)
    return prompt_token_ids(teacher_tokenizer, rendered)


def _last_user_text(prompt) -> str:
    users = [m for m in prompt if m.get("role") == "user"]
    return users[-1]["content"] if users else ""


class TokenizerBridge:
    """The student's rows in a teacher's tokens, and the teacher's scores back on the
    student's. ``who`` names the setting in errors (``signal.teacher_tokenizer=auto``)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, *, unencodable_logp: float | None = None,
                 context: str | None = None, who: str = "signal.teacher_tokenizer=auto", workers: int = 0):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.unencodable_logp, self.context, self.who = unencodable_logp, context, who
        self.student_stops = set(stop_token_ids(student_tokenizer))
        self.teacher_stop = end_of_turn_id(teacher_tokenizer)
        pad_id = teacher_tokenizer.pad_token_id
        self.teacher_pad = pad_id if pad_id is not None else teacher_tokenizer.eos_token_id
        # workers > 0: the replies are aligned in that many processes, off the training thread
        self.pool = AlignmentPool(student_tokenizer, teacher_tokenizer, workers, student_stops=self.student_stops,
                                  teacher_stop=self.teacher_stop,
                                  unknown_ok=unencodable_logp is not None) if workers else None

    def close(self) -> None:
        """Stop the alignment workers, if any."""
        if self.pool is not None:
            self.pool.close()

    def _alignments(self, replies: list[list[int]]) -> list[Alignment | AlignmentError]:
        """Each reply's alignment (or why it has none): in the pool's processes, else here."""
        if self.pool is not None:
            return self.pool.align(replies)
        out = []
        for ids in replies:
            try:
                out.append(align_reply(ids, self.student, self.teacher, student_stops=self.student_stops,
                                       teacher_stop=self.teacher_stop, unknown_ok=self.unencodable_logp is not None))
            except AlignmentError as error:
                out.append(error)
        return out

    def rows(self, batch: dict, device: torch.device | str) -> TeacherRows:
        """The batch's rows in the teacher's tokens. A sampled reply it cannot encode is a
        failed row (:attr:`TeacherRows.failed`); the data's, an :class:`AlignmentError`."""
        fields.require(batch, fields.PROMPTS, who=f"{self.who} (the prompts, rendered in the teacher's format)")
        response_ids, response_mask = batch[fields.RESPONSE_IDS].cpu(), batch[fields.RESPONSE_MASK].cpu()
        turns = batch.get(fields.LOSS_MASK, batch[fields.RESPONSE_MASK])  # the turns, whatever failed
        if not torch.equal(turns.cpu().bool(), response_mask.bool()):
            raise ValueError(f"{self.who} scores single-turn replies, and this batch's responses hold turns the loss "
                             f"skips (conversations with several assistant turns); train on the last assistant turn "
                             f"(task.loss_on=last_assistant)")
        prompts = batch[fields.PROMPTS]
        references = batch.get(fields.REFERENCES) or [None] * len(prompts)
        teacher_prompts = batch.get(fields.TEACHER_PROMPTS) or [None] * len(prompts)
        prompt_rows, reply_rows, alignments, unknown_rows, failed = [], [], [], [], []
        sampled, examples = fields.is_sampled(batch), batch.get(fields.EXAMPLE_INDEX)
        replies = [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)]
        for b, alignment in enumerate(self._alignments(replies)):
            if isinstance(alignment, AlignmentError):
                error = alignment
                setting = "reference" if self.who.startswith("reference") else "signal"
                if sampled:  # the policy wrote it: this row fails, the batch goes on
                    failed.append(row_failure(b, f"{self.who}, sampled row {b}", error))
                    alignment = Alignment("", [self.teacher_stop], [])
                else:
                    example = f" (the data's example {int(examples[b])})" if examples is not None else ""
                    raise AlignmentError(
                        f"{self.who}, row {b}{example}: {error}; set {setting}.unencodable_logp (the log-prob a token "
                        f"it cannot encode gets, far below that of anything the policy samples, e.g. -100) to score "
                        f"such replies as ones it would never write, or fix the data (a sampled reply would be left "
                        f"out and counted; the data's own response is a data error)") from None
            columns = {"reference": references[b], "teacher_prompt": teacher_prompts[b]}
            prompt_rows.append(teacher_prompt_ids(self.teacher, prompts[b], self.context, columns, self.who))
            reply_rows.append(alignment.teacher_ids)
            alignments.append(alignment)
            unknown = set(alignment.unknown)
            unknown_rows.append([k in unknown for k in range(len(alignment.teacher_ids))])
        prompt_ids, prompt_mask = pad(prompt_rows, self.teacher_pad, "left")
        reply_ids, reply_mask = pad(reply_rows, self.teacher_pad, "right")
        width = reply_ids.shape[1]
        unknown = torch.tensor([u + [False] * (width - len(u)) for u in unknown_rows], dtype=torch.bool).reshape(-1, width)
        return TeacherRows(prompt_ids.to(device), prompt_mask.to(device), reply_ids.to(device), reply_mask.to(device),
                           alignments, unknown.to(device), failed)

    def teacher_logp(self, rows: TeacherRows, token_logp: Tensor) -> Tensor:
        """[B, R_t] the teacher's log-prob of each of its tokens, ``unencodable_logp`` on the
        ones that stand for characters it cannot encode, 0 on padding."""
        if self.unencodable_logp is not None:
            token_logp = torch.where(rows.unknown, token_logp.new_tensor(self.unencodable_logp), token_logp)
        return torch.where(rows.response_mask.bool(), token_logp, 0.0)

    def span_fields(self, rows: TeacherRows, teacher_logp: Tensor, student_width: int) -> dict:
        """{span_id [B, R], span_end [B, R], teacher_span_logp [B, S]} from the teacher's
        log-prob of each of its tokens ([B, R_t], :meth:`teacher_logp`)."""
        device = teacher_logp.device
        spans = max((len(a.spans) for a in rows.alignments), default=0)
        span_id = torch.tensor([span_ids(a.spans, student_width) for a in rows.alignments],
                               dtype=torch.long).reshape(-1, student_width)
        # each teacher token's span: the span sums are one scatter
        teacher_span = torch.tensor([span_ids(a.spans, teacher_logp.shape[1], teacher=True) for a in rows.alignments],
                                    dtype=torch.long).reshape(teacher_logp.shape)
        row, end, _, _ = span_ends(rows.alignments)
        span_end = torch.zeros(len(rows.alignments), student_width)
        span_end[row, end] = 1.0
        sums = span_sums(teacher_logp.float(), teacher_span.to(device), max(spans, 1))
        return {fields.SPAN_ID: span_id.to(device), fields.SPAN_END: span_end.to(device), fields.TEACHER_SPAN_LOGP: sums}

    def span_topk_fields(self, rows: TeacherRows, teacher_logp: Tensor, topk_ids: Tensor, topk_logp: Tensor,
                         student_width: int, match: VocabularyMatch | None) -> dict:
        """{teacher_span_topk_ids [B, R, K], teacher_span_topk_logp [B, R, K]}: on each span's
        last student token, the teacher's top-k at its own last token of the span, each
        log-prob plus the teacher's log-prob of the span's earlier tokens (the probability
        of the span's prefix followed by that token); ids are the student's twin of each
        token (-1 where it has none, or without ``match``). ``topk_ids``/``topk_logp``
        [B, R_t, K] are the teacher's at each of its tokens' positions."""
        batch, k = topk_ids.shape[0], topk_ids.shape[-1]
        device = topk_logp.device
        # "no entry" is a log-prob whose probability is 0 but which is finite: the non-finite
        # guard checks every float field of the batch
        out_logp = torch.full((batch, student_width, k), NO_ENTRY_LOGP, device=device)
        out_ids = torch.full((batch, student_width, k), -1, dtype=torch.long, device=device)
        mapped = (match.teacher_to_student.to(device)[topk_ids] if match is not None
                  else torch.full_like(topk_ids, -1))
        row, end, first, last = (t.to(device) for t in span_ends(rows.alignments))  # [n] each
        # log-prob of the teacher's tokens before each: the sum over a span's earlier tokens is a difference
        before_each = torch.nn.functional.pad(teacher_logp.float().cumsum(-1), (1, 0)).to(device)  # [B, R_t + 1]
        before = torch.where(last > first, before_each[row, last] - before_each[row, first], 0.0)  # [n]
        out_logp[row, end] = topk_logp[row, last].float() + before[:, None]
        out_ids[row, end] = mapped[row, last]
        return {fields.TEACHER_SPAN_TOPK_IDS: out_ids,
                fields.TEACHER_SPAN_TOPK_LOGP: out_logp.clamp_min(NO_ENTRY_LOGP)}
