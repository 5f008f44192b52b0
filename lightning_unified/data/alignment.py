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
for one reply of 2,048 tokens); instead each token's text after another token is decoded
once per vocabulary entry and kept, a row's tokens are placed a run at a time against its
text, and only where that cannot place them (inside a character written as several byte
tokens) are a few tokens decoded again (``scripts/benchmark_alignment.py``).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast


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
    """Each of ``rows`` decoded as :func:`_decode` does. A fast tokenizer's ``decode`` is its
    backend's with no clean-up, so the backend is called directly: a quarter of the time of
    the Python wrapper's checks and conversions on these short rows (and its batch call
    costs more than it saves on a few short rows)."""
    if getattr(type(tokenizer), "_decode", None) is PreTrainedTokenizerFast._decode:
        decode = tokenizer.backend_tokenizer.decode
        return [decode(row, skip_special_tokens=False) for row in rows]
    return [_decode(tokenizer, row) for row in rows]


# each tokenizer's pieces (:func:`token_pieces`, :func:`_run_piece`): (context id, its text,
# {id or run of ids: piece or None}), emptied when it holds more than _PIECES_KEPT
_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PIECES_KEPT = 1 << 20


def token_pieces(tokenizer, ids: list[int]) -> list[str | None]:
    """What each of ``ids`` adds to a text after another token: the token decoded after a
    plain one (a letter) less that one's own text. After another token, not alone, because
    a decoder treats a call's first token on its own (SentencePiece drops its leading
    space). None where that piece holds a replacement character (a byte token of an
    unfinished character: its text depends on its neighbours). Kept per tokenizer, so each
    id of its vocabulary is decoded once per process."""
    entry = _PIECES.get(tokenizer)
    if entry is None:
        entry = _PIECES[tokenizer] = (*_context_token(tokenizer), {})
    context, context_text, table = entry
    if len(table) > _PIECES_KEPT:  # runs of sampled garbage would otherwise pile up over a long run
        table.clear()
    missing = list({i for i in ids if i not in table})
    if missing:
        if context is None:
            table.update(dict.fromkeys(missing))
        else:
            for i, text in zip(missing, decode_many(tokenizer, [[context, i] for i in missing])):
                piece = text[len(context_text):]
                table[i] = piece if text.startswith(context_text) and REPLACEMENT not in piece else None
    return [table[i] for i in ids]


def _run_piece(tokenizer, run: tuple[int, ...]) -> str | None:
    """What the tokens ``run`` add together after the plain token of :func:`token_pieces`
    (replacement characters kept), None where there is none; kept with the pieces."""
    context, context_text, table = _PIECES[tokenizer]
    if run not in table:
        text = decode_many(tokenizer, [[context, *run]])[0] if context is not None else ""
        table[run] = text[len(context_text):] if context is not None and text.startswith(context_text) else None
    return table[run]


def _context_token(tokenizer) -> tuple[int | None, str]:
    """(a token that decodes to a plain letter or digit, its text), or (None, "") where the
    tokenizer has none (every token then goes the slow way)."""
    for candidate in ("a", "x", "0"):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if ids:
            text = decode_many(tokenizer, [ids[-1:]])[0]
            if text.strip() and REPLACEMENT not in text:
                return ids[-1], text
    return None, ""


def student_boundaries(tokenizer, ids: list[int]) -> tuple[str, dict[int, int]]:
    """(the decoded text, {character position: tokens before it}) at every position where a
    prefix of ``ids`` decodes to a prefix of the text (never inside a byte-fallback
    character); a token that decodes to nothing joins the span before it (where several
    prefixes decode to the same position, the longest counts).

    Linear: a prefix's text is the last boundary's text followed by what the tokens since
    then add. Each token's piece (:func:`token_pieces`) is that, wherever the decoder is
    local; a run of tokens whose pieces are together the text's next characters takes a
    boundary after each. Where a piece is missing (a byte token of an unfinished character)
    or is not the text's next characters, the next few tokens are decoded together, after
    the plain token and then after the span before them as context, one more token at a
    time (:func:`_next_boundary`). What a prefix decodes to is assumed to depend only on the
    tokens since the boundary before the last one (true of the byte-level, byte-fallback,
    SentencePiece, WordPiece and character decoders; where it is not, the prefixes there
    are decoded whole); ``tests/test_alignment.py`` checks the positions against decoding
    every prefix."""
    n = len(ids)
    if n == 0:
        return decode_many(tokenizer, [ids])[0], {0: 0}
    text, first = decode_many(tokenizer, [ids, ids[:1]])
    pieces = token_pieces(tokenizer, ids)
    pieces[0] = first if REPLACEMENT not in first else None  # the first token is decoded alone
    missing = [k for k, piece in enumerate(pieces) if piece is None] + [n]
    bounds = {0: 0}
    k, pos = 0, 0  # the first k tokens decode to text[:pos], a boundary
    context = 0  # where decodes of the tokens since the last boundary start: the boundary before it
    next_missing = 0  # index into ``missing``: the first missing piece at or after k
    careful_until = 0  # after a run that is not the text's next characters, token by token to its end
    while k < n:
        while missing[next_missing] < k:
            next_missing += 1
        run_end = missing[next_missing]
        run = "".join(pieces[k:run_end]) if k >= careful_until else None
        if run_end > k and run is not None and text.startswith(run, pos):  # the whole run at once
            lengths = itertools.accumulate((len(p) for p in pieces[k:run_end]), initial=pos)
            next(lengths)
            bounds.update(zip(lengths, range(k + 1, run_end + 1)))
            bounds[0] = 0  # leading tokens that decode to nothing join the first span
            context = max((j for j in range(k, run_end) if pieces[j]), default=context)
            k, pos = run_end, pos + len(run)
            continue
        careful_until = max(careful_until, run_end)
        piece = pieces[k]
        if piece is not None and text.startswith(piece, pos):  # token by token until one is not
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
    n = len(ids)
    # first the few tokens after k together after the plain token of token_pieces, kept per
    # tokenizer (the same character's bytes come back often); not for the row's first token,
    # which has no token before it, nor past a piece with a replacement character that the
    # text holds too (then only the decodes below tell)
    for j in range(k + 1, min(k + 5, n + 1) if k > 0 else k):
        piece = _run_piece(tokenizer, tuple(ids[k:j]))
        if piece is None or (REPLACEMENT in piece and text.startswith(piece, pos)):
            break
        if text.startswith(piece, pos):
            bounds[pos + len(piece)] = j
            return j, piece
    for start in dict.fromkeys((context, 0)):
        # the windows come a few at a time (a character is at most 4 byte tokens)
        first, last = k + 1, min(k + 5, n + 1)
        head, *windows = decode_many(tokenizer, [ids[start:k], *(ids[start:j] for j in range(first, last))])
        if not text.endswith(head, 0, pos):
            continue
        met = {}
        while windows:
            for j, window in zip(range(first, last), windows):
                piece = window[len(head):]
                if window.startswith(head) and (pos > 0 or piece) and text.startswith(piece, pos):
                    met[pos + len(piece)] = j
                    if not piece.endswith(REPLACEMENT) or j == n:
                        bounds.update(met)
                        return j, piece
            first, last = last, min(last + 2 * (last - first), n + 1)
            windows = decode_many(tokenizer, [ids[start:j] for j in range(first, last)])
    return len(ids), text[pos:]


def teacher_tokens(tokenizer, text: str, unknown_ok: bool = False) -> tuple[list[int], dict[int, int]]:
    """(the teacher's ids for ``text``, {character position: tokens before it}) from its
    offsets: a position after token k counts when no earlier token ends after it and no
    later token starts before it (byte pieces of one character share its offsets).
    ``unknown_ok``: characters the teacher reads as its unknown token are accepted (the
    caller scores those tokens itself); any other loss is still refused."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    back = decode_many(tokenizer, [ids])[0]
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
    it and no later token starts before it. The earlier tokens' latest end and the later
    tokens' earliest start are running maxima and minima, so the whole is linear."""
    ends = [end for _, end in offsets]
    latest_end = itertools.accumulate(ends, max)
    # later_start[k]: the earliest start of tokens k + 1, k + 2, ... (the text's end after the last)
    later_start = [*itertools.accumulate((start for start, _ in reversed(offsets[1:])), min, initial=length)][::-1]
    bounds = {0: 0}
    bounds.update((end, k + 1) for k, (end, latest, later) in enumerate(zip(ends, latest_end, later_start))
                  if end == latest and later >= end)
    bounds[length] = len(offsets)
    return bounds


def align(student_ids: list[int], student_tokenizer, teacher_tokenizer, unknown_ok: bool = False) -> Alignment:
    """The spans of ``student_ids`` and their text's tokens under ``teacher_tokenizer``."""
    text, student = student_boundaries(student_tokenizer, student_ids)
    teacher_ids, teacher = teacher_tokens(teacher_tokenizer, text, unknown_ok)
    common = sorted(set(student) & set(teacher))
    spans = [(student[a], student[b], teacher[a], teacher[b]) for a, b in zip(common, common[1:])]
    unknown_id = teacher_tokenizer.unk_token_id
    unknown = tuple(k for k, i in enumerate(teacher_ids) if i == unknown_id) if unknown_ok else ()
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
