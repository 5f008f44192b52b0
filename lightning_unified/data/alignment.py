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
often is not): its boundaries are where a prefix of its own ids decodes to a prefix of the
text (:func:`student_boundaries`).

**Cost**: linear in the row's length. Decoding every prefix would decode n^2/2 tokens (0.62 s
for one reply of 2,048 tokens); instead each token is decoded once alone and once after the
token before it, all in one call, and only where that cannot place it (inside a character
written as several byte tokens) are a few tokens decoded again from the last boundary
(``scripts/benchmark_alignment.py``).
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


# what a byte-level or byte-fallback decoder writes for an incomplete UTF-8 character
REPLACEMENT = "\ufffd"


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_many(tokenizer, rows: list[list[int]]) -> list[str]:
    """Each of ``rows`` decoded as :func:`_decode` does, in one call to a fast tokenizer's
    own batch decoder (whose ``decode`` is the backend's with no clean-up); one call per row
    for any other tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if getattr(type(tokenizer), "_decode", None) is PreTrainedTokenizerFast._decode:
        return tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=False)
    return [_decode(tokenizer, row) for row in rows]


def student_boundaries(tokenizer, ids: list[int]) -> tuple[str, dict[int, int]]:
    """(the decoded text, {character position: tokens before it}) at every position where a
    prefix of ``ids`` decodes to a prefix of the text (never inside a byte-fallback
    character); a token that decodes to nothing joins the span before it (where several
    prefixes decode to the same position, the longest counts).

    Linear: a prefix's text is the last boundary's text followed by what the tokens since
    then add, read from a decode that starts a little earlier (a decoder treats a call's
    first token on its own: SentencePiece drops its leading space) and cut after that
    context's own text. Token ``k`` is first tried alone after token ``k - 1``, both decoded
    for every ``k`` in one batch; where that piece is not the text's next characters, or
    holds a replacement character (a byte token of an unfinished character), the tokens
    from the last boundary are decoded again one more at a time (:func:`_next_boundary`).
    What a prefix decodes to is assumed to depend only on the tokens since the boundary
    before the last one (true of the byte-level, byte-fallback, SentencePiece, WordPiece and
    character decoders; where it is not, the prefixes there are decoded whole);
    ``tests/test_alignment.py`` checks the positions against decoding every prefix."""
    n = len(ids)
    decoded = decode_many(tokenizer, [ids, *([i] for i in ids), *(ids[k - 1:k + 1] for k in range(1, n))])
    text, alone, after = decoded[0], decoded[1:n + 1], decoded[n + 1:]
    bounds = {0: 0}
    k, pos = 0, 0  # the first k tokens decode to text[:pos], a boundary
    context = 0  # where decodes of the tokens since the last boundary start: the boundary before it
    while k < n:
        if k == 0:
            piece = alone[0]
        else:
            previous = alone[k - 1]
            piece = after[k - 1][len(previous):] if after[k - 1].startswith(previous) else None
        if piece is not None and REPLACEMENT not in piece and text.startswith(piece, pos):
            stop = k + 1
            if pos + len(piece) > 0:
                bounds[pos + len(piece)] = stop
        else:
            stop, piece = _next_boundary(tokenizer, ids, text, context, k, pos, bounds)
        if piece:
            context = k
        k, pos = stop, pos + len(piece)
    bounds[len(text)] = n
    return text, bounds


def _next_boundary(tokenizer, ids: list[int], text: str, context: int, k: int, pos: int,
                   bounds: dict[int, int]) -> tuple[int, str]:
    """(j, the text of tokens [k, j)) for the first ``j > k`` at which the first ``j`` tokens
    decode to a prefix of ``text`` that ends in a whole character, given that the first
    ``k`` decode to ``text[:pos]``; each prefix of the text met on the way is entered in
    ``bounds``. A prefix's text is tokens ``[context, j)`` decoded, less what tokens
    ``[context, k)`` decode to; where that context does not decode to the end of
    ``text[:pos]`` (it starts inside a character) or no prefix comes out, the prefixes are
    decoded whole (context 0). A prefix ending in a replacement character counts (the text
    may hold one) but is not where the search stops, unless it is the whole row: a later
    prefix may end at the same place with the character whole."""
    for start in dict.fromkeys((context, 0)):
        head = _decode(tokenizer, ids[start:k])
        if not text[:pos].endswith(head):
            continue
        met = {}
        for j in range(k + 1, len(ids) + 1):
            window = _decode(tokenizer, ids[start:j])
            piece = window[len(head):]
            if window.startswith(head) and (pos > 0 or piece) and text.startswith(piece, pos):
                met[pos + len(piece)] = j
                if not piece.endswith(REPLACEMENT) or j == len(ids):
                    bounds.update(met)
                    return j, piece
    return len(ids), text[pos:]


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
        pieces = decode_many(tokenizer, [[i] for i in ids])
        back = "".join(text[start:end] if i == unknown_id else piece for i, (start, end), piece in
                       zip(ids, offsets, pieces))
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
    return ids, offset_boundaries(offsets, len(text))


def offset_boundaries(offsets: list[tuple[int, int]], length: int) -> dict[int, int]:
    """{character position: tokens before it} from tokens' character ``offsets`` of a text of
    ``length`` characters: a position after token k counts when no earlier token ends after
    it and no later token starts before it. The later tokens' earliest start is one pass
    from the end, so the whole is linear."""
    later_start = [length] * (len(offsets) + 1)  # later_start[k]: the earliest start of tokens k, k + 1, ...
    for k in range(len(offsets) - 1, -1, -1):
        later_start[k] = min(later_start[k + 1], offsets[k][0])
    bounds = {0: 0}
    latest_end = 0
    for k, (_, end) in enumerate(offsets):
        latest_end = max(latest_end, end)
        if end == latest_end and later_start[k + 1] >= end:
            bounds[end] = k + 1
    bounds[length] = len(offsets)
    return bounds


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
