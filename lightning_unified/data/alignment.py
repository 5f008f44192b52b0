"""Two tokenizations of one text, cut at the character positions where both have a token
boundary: the spans over which a student's and a teacher's log-probabilities compare
(a span's log-probability under each model is the sum of its tokens').

The student's tokens are decoded once, and that text is encoded with the teacher's
tokenizer. What re-encoding can change, and what happens then:

- **Whitespace**: decoding keeps it as written (no clean-up of spaces before punctuation),
  so the teacher reads the student's exact text.
- **Special tokens** (an end-of-turn token) decode to their text; a teacher whose tokenizer
  has the same special token reads it as one token, another reads its characters.
- **Byte fallback**: a character the student wrote as several byte tokens has no boundary
  inside it; the teacher's tokens for it fall in the same span.
- **Characters the teacher cannot encode** (its unknown token, or text that decodes back
  otherwise) are refused, naming them: no span could compare them. A run may accept the
  unknown token instead (``signal.unencodable_logp``): the caller then scores those tokens.
- **A reply's final stop token** (:func:`align_reply`) is the teacher's own end of turn,
  whatever the two tokens' texts.

A student's tokens need not be the canonical tokenization of their text (a sampled reply
often is not): its boundaries come from decoding each prefix of its own ids.
"""

from __future__ import annotations

from dataclasses import dataclass


class AlignmentError(ValueError):
    """A text the teacher's tokenizer cannot encode without loss; names the characters."""


@dataclass(frozen=True)
class Alignment:
    """``spans[i] = (s0, s1, t0, t1)``: student tokens ``[s0, s1)`` and teacher tokens
    ``[t0, t1)`` cover the same characters; the spans cover both sequences, in order."""

    text: str
    teacher_ids: list[int]
    spans: list[tuple[int, int, int, int]]
    # the teacher tokens that stand for characters it cannot encode (its unknown token),
    # kept only where the caller accepts them (``unknown_ok``)
    unknown: tuple[int, ...] = ()


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def student_boundaries(tokenizer, ids: list[int]) -> tuple[str, dict[int, int]]:
    """(the decoded text, {character position: tokens before it}) at every position where a
    prefix of ``ids`` decodes to a prefix of the text (never inside a byte-fallback
    character); a token that decodes to nothing joins the span before it."""
    text = _decode(tokenizer, ids)
    bounds = {0: 0}
    for k in range(1, len(ids) + 1):
        prefix = _decode(tokenizer, ids[:k])
        if text.startswith(prefix) and len(prefix) > 0:
            bounds[len(prefix)] = k
    bounds[len(text)] = len(ids)
    return text, bounds


def teacher_tokens(tokenizer, text: str, unknown_ok: bool = False) -> tuple[list[int], dict[int, int]]:
    """(the teacher's ids for ``text``, {character position: tokens before it}) from its
    offsets: a position after token k counts when no earlier token ends after it and no
    later token starts before it (byte pieces of one character share its offsets).
    ``unknown_ok``: characters the teacher reads as its unknown token are accepted (the
    caller scores those tokens itself); any other loss is still refused."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    back = _decode(tokenizer, ids)
    unknown_id = tokenizer.unk_token_id
    if back != text and unknown_ok and unknown_id is not None and unknown_id in ids:
        # the text with each unknown token's characters put back must be the text itself
        back = "".join(text[start:end] if i == unknown_id else _decode(tokenizer, [i]) for i, (start, end) in
                       zip(ids, offsets))
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
        # the characters behind the unknown token, where the tokenizer has one; else those
        # missing from what it reads back
        unknown = {c for i, (start, end) in zip(ids, offsets) if i == unknown_id for c in text[start:end]}
        lost = sorted(unknown or {c for c in text[at:] if c not in back[at:]} or {text[at:at + 1]})
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise AlignmentError(f"the teacher's tokenizer {name} cannot encode the student's text without loss: from "
                             f"character {at} it reads {text[at:at + 20]!r} back as {back[at:at + 20]!r} "
                             f"(characters it cannot encode: {lost})")
    bounds = {0: 0}
    latest_end = 0
    for k, (start, end) in enumerate(offsets):
        latest_end = max(latest_end, end)
        later_start = min((s for s, _ in offsets[k + 1:]), default=len(text))
        if end == latest_end and later_start >= end:
            bounds[end] = k + 1
    bounds[len(text)] = len(ids)
    return ids, bounds


def align(student_ids: list[int], student_tokenizer, teacher_tokenizer, unknown_ok: bool = False) -> Alignment:
    """The spans of ``student_ids`` and their text's tokens under ``teacher_tokenizer``."""
    text, student = student_boundaries(student_tokenizer, student_ids)
    teacher_ids, teacher = teacher_tokens(teacher_tokenizer, text, unknown_ok)
    common = sorted(set(student) & set(teacher))
    spans = [(student[a], student[b], teacher[a], teacher[b]) for a, b in zip(common, common[1:])]
    unknown_id = teacher_tokenizer.unk_token_id
    unknown = tuple(k for k, i in enumerate(teacher_ids) if unknown_ok and i == unknown_id)
    return Alignment(text, teacher_ids, spans, unknown)


def align_reply(student_ids: list[int], student_tokenizer, teacher_tokenizer, *, student_stops: set[int],
                teacher_stop: int, unknown_ok: bool = False) -> Alignment:
    """:func:`align` for a reply: a final stop token of the student's (its end of turn or
    EOS) is the teacher's own end of turn ``teacher_stop``, one span of one token each,
    whatever the two tokens' texts (``<|im_end|>`` against ``<eos>``). Text that merely
    looks like a stop token elsewhere in the reply is aligned as text."""
    ends = bool(student_ids) and student_ids[-1] in student_stops
    body = student_ids[:-1] if ends else student_ids
    if not body:
        alignment = Alignment("", [], [])
    else:
        alignment = align(body, student_tokenizer, teacher_tokenizer, unknown_ok)
    if not ends:
        return alignment
    n, m = len(body), len(alignment.teacher_ids)
    return Alignment(alignment.text, [*alignment.teacher_ids, teacher_stop], [*alignment.spans, (n, n + 1, m, m + 1)],
                     alignment.unknown)
