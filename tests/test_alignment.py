"""Span alignment of two tokenizations on awkward text: leading spaces, digits split
differently, byte-fallback characters, an end-of-turn token, a non-canonical student
tokenization, and characters the teacher cannot encode (named). The student is SmolLM2's
real tokenizer; the teachers are small real tokenizers built here.

Long rows: the linear alignment places every boundary where decoding each prefix of the
student's ids (the definition, quadratic) does, on 2,048-token rows of emoji, CJK and
combining marks and on rows of arbitrary sampled ids, for a byte-level (SmolLM2), a
SentencePiece byte-fallback and a character tokenizer; the tokens it decodes and the steps
it takes grow linearly with the row."""

from __future__ import annotations

import copy
import random
import sys

import pytest

import lightning_unified.data.alignment as alignment_module
from lightning_unified.data.alignment import AlignmentError, align, student_boundaries
from tests.lightning_helpers import chat_tokenizer
from tests.test_conversations import require_smollm2_tokenizer


def pieces_tokenizer(pattern: str, alphabet: str, specials: tuple[str, ...] = ()):
    """A real fast tokenizer whose tokens are the pattern's matches (each in ``alphabet``'s
    vocabulary), with EOS and ``specials``."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(pattern, alphabet, flags=re.S)))
    vocab = {tok: i for i, tok in enumerate(["<eos>", "<unk>", *specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   additional_special_tokens=list(specials))


@pytest.fixture(scope="module")
def smollm2():
    return require_smollm2_tokenizer()


def student(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_one_tokenizer_aligns_token_for_token(smollm2) -> None:
    ids = student(smollm2, "What is 23+41? The answer is 64.")
    alignment = align(ids, smollm2, smollm2)
    assert alignment.teacher_ids == ids
    assert alignment.spans == [(i, i + 1, i, i + 1) for i in range(len(ids))]


def test_leading_spaces_and_words_against_characters(smollm2) -> None:
    ids = student(smollm2, " hello world")
    assert smollm2.convert_ids_to_tokens(ids) == ["Ġhello", "Ġworld"]
    alignment = align(ids, smollm2, chat_tokenizer())  # one token per character
    assert alignment.spans == [(0, 1, 0, 6), (1, 2, 6, 12)], "each word with its leading space"


def test_digits_split_differently(smollm2) -> None:
    pairs = pieces_tokenizer(r"\d\d|.", "0123456789+= " + "".join(f"{a}{b}" for a in range(10) for b in range(10)))
    ids = student(smollm2, "1234+56=1290")
    assert len(ids) == 12, "SmolLM2 writes every digit alone"
    alignment = align(ids, smollm2, pairs)
    assert pairs.convert_ids_to_tokens(alignment.teacher_ids) == ["12", "34", "+", "56", "=", "12", "90"]
    assert alignment.spans == [(0, 2, 0, 1), (2, 4, 1, 2), (4, 5, 2, 3), (5, 7, 3, 4), (7, 8, 4, 5), (8, 10, 5, 6),
                               (10, 12, 6, 7)]


def test_byte_fallback_characters_have_no_boundary_inside(smollm2) -> None:
    characters = pieces_tokenizer(r".", " 日本")
    ids = student(smollm2, " 日本")
    assert smollm2.convert_ids_to_tokens(ids) == ["Ġæ", "Ĺ", "¥", "æľ¬"], "the first character is three byte tokens"
    alignment = align(ids, smollm2, characters)
    # " 日" is one span: SmolLM2's first token holds the space and the first byte of 日
    assert alignment.spans == [(0, 3, 0, 2), (3, 4, 2, 3)]


def test_an_end_of_turn_token(smollm2) -> None:
    ids = student(smollm2, "7<|im_end|>")
    assert smollm2.convert_ids_to_tokens(ids) == ["7", "<|im_end|>"]
    same = align(ids, smollm2, chat_tokenizer())  # it has <|im_end|> as a special token too
    assert same.spans == [(0, 1, 0, 1), (1, 2, 1, 2)]
    plain = pieces_tokenizer(r".", "7<|im_end>")  # no such token: its characters
    assert align(ids, smollm2, plain).spans == [(0, 1, 0, 1), (1, 2, 1, 11)]


def test_a_non_canonical_student_tokenization(smollm2) -> None:
    ids = [smollm2.convert_tokens_to_ids("h"), smollm2.convert_tokens_to_ids("ello")]
    alignment = align(ids, smollm2, smollm2)
    assert smollm2.convert_ids_to_tokens(alignment.teacher_ids) == ["hello"]
    assert alignment.spans == [(0, 2, 0, 1)]


def test_characters_the_teacher_cannot_encode_are_named(smollm2) -> None:
    with pytest.raises(AlignmentError, match=r"cannot encode the student's text without loss: from character 3 .* "
                                             r"\(characters it cannot encode: \['日'\]\)"):
        align(student(smollm2, "ok 日"), smollm2, chat_tokenizer())


# --- long rows: the linear alignment against the definition ------------------------------

# emoji (with a skin tone, a ZWJ sequence, a flag), CJK, combining marks, Arabic, a literal
# replacement character, tabs and newlines, runs of spaces, digits
AWKWARD = ["hello", " world", " 日本語", "中文字符", " 😀", "👍🏽", "👩\u200d💻", "🇫🇷", " café", " e\u0301",
           "a\u0308\u0301", " naïve", "\n", "\t", "  ", " 1234", "+", " the", "ﷺ", "\ufffd", " ok."]


def awkward_text(pieces: int, seed: int, extra: tuple[str, ...] = ()) -> str:
    """``pieces`` of :data:`AWKWARD` (and ``extra``) at random, after a word: a SentencePiece
    teacher cannot encode a leading space (its decoder drops it)."""
    r = random.Random(seed)
    return "Text:" + "".join(r.choice(AWKWARD + list(extra)) for _ in range(pieces))


def sentencepiece_tokenizer():
    """A real Llama-style SentencePiece tokenizer (BPE with byte fallback, "▁" for spaces, a
    decoder that strips the leading space), trained here on a little English: CJK and emoji
    fall back to byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat", "hello world, naïve café", "1234 + 5678 = 6912"] * 20,
                                trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def boundaries_by_definition(tokenizer, ids: list[int]) -> tuple[str, dict[int, int]]:
    """Every prefix of the ids decoded: a boundary where it is a (non-empty) prefix of the
    text, the longest such prefix for each position."""
    text = decode(tokenizer, ids)
    bounds = {0: 0}
    for k in range(1, len(ids) + 1):
        prefix = decode(tokenizer, ids[:k])
        if prefix and text.startswith(prefix):
            bounds[len(prefix)] = k
    bounds[len(text)] = len(ids)
    return text, bounds


def spans_by_definition(text: str, student: dict[int, int], teacher_tokenizer) -> list[tuple]:
    """The spans from the student's boundaries (:func:`boundaries_by_definition`) and the
    teacher's offsets, each position after a teacher token checked against every token
    before and after it."""
    encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    teacher = {0: 0, len(text): len(offsets)}
    for k, (_, end) in enumerate(offsets):
        if all(e <= end for _, e in offsets[:k + 1]) and all(s >= end for s, _ in offsets[k + 1:]):
            teacher[end] = k + 1
    common = sorted(set(student) & set(teacher))
    return [(student[a], student[b], teacher[a], teacher[b]) for a, b in zip(common, common[1:])]


@pytest.fixture(scope="module")
def sentencepiece():
    return sentencepiece_tokenizer()


@pytest.mark.parametrize("student_name,length", [("smollm2", 2048), ("sentencepiece", 1024), ("characters", 1024)])
def test_a_long_awkward_row_aligns_as_decoding_every_prefix_does(student_name, length, smollm2,
                                                                 sentencepiece) -> None:
    student_tok = {"smollm2": smollm2, "sentencepiece": sentencepiece, "characters": chat_tokenizer()}[student_name]
    teacher_tok = sentencepiece if student_name != "sentencepiece" else smollm2
    text = awkward_text(800, seed=0, extra=("<|im_end|>",) if student_name != "sentencepiece" else ())
    if student_name == "characters":  # its alphabet is ASCII
        text = "".join(c for c in text if c in student_tok.get_vocab())
    ids = student(student_tok, text)[:length]
    assert len(ids) == length
    expected = boundaries_by_definition(student_tok, ids)
    assert student_boundaries(student_tok, ids) == expected
    if student_name != "characters":  # no boundary inside a character written as several byte tokens
        assert len(expected[1]) < len(ids) - 50
    got = align(ids, student_tok, teacher_tok)
    assert got.spans == spans_by_definition(*expected, teacher_tok)
    assert len(got.spans) > length // 4


@pytest.mark.parametrize("student_name", ["smollm2", "sentencepiece"])
def test_rows_of_arbitrary_sampled_ids_align_as_decoding_every_prefix_does(student_name, smollm2,
                                                                          sentencepiece) -> None:
    """A sampled reply may be any ids: lone byte tokens that make invalid UTF-8 (decoded as
    replacement characters, which the text then holds), special tokens anywhere."""
    tokenizer = {"smollm2": smollm2, "sentencepiece": sentencepiece}[student_name]
    vocab = tokenizer.get_vocab()
    byte_ids = sorted(i for t, i in vocab.items() if t.startswith("<0x") or len(t) == 1)
    for seed in range(24):
        r = random.Random(seed)
        if seed % 3 == 0:  # any ids
            ids = [r.randrange(len(tokenizer)) for _ in range(160)]
        elif seed % 3 == 1:  # mostly byte tokens
            ids = [r.choice(byte_ids) if r.random() < 0.6 else r.randrange(len(tokenizer)) for _ in range(160)]
        else:  # awkward text with byte tokens and special tokens sampled into it
            ids = student(tokenizer, awkward_text(40, seed))
            for _ in range(12):
                ids.insert(r.randrange(len(ids)), r.choice(byte_ids + list(tokenizer.all_special_ids)))
        assert student_boundaries(tokenizer, ids) == boundaries_by_definition(tokenizer, ids), f"seed {seed}"


class CountingBackend:
    """A real fast tokenizer's backend that counts the token ids it is asked to decode."""

    def __init__(self, backend):
        self.backend, self.decoded = backend, 0

    def decode(self, ids, *args, **kwargs):
        self.decoded += len(ids)
        return self.backend.decode(ids, *args, **kwargs)

    def decode_batch(self, rows, *args, **kwargs):
        self.decoded += sum(len(r) for r in rows)
        return self.backend.decode_batch(rows, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def alignment_work(ids: list[int], student_tok, teacher_tok) -> tuple[int, int]:
    """(token ids the student's tokenizer decodes, lines of data/alignment.py run) to align
    ``ids``: counts of work, the same on every machine."""
    counting = copy.deepcopy(student_tok)
    counting._tokenizer = CountingBackend(counting._tokenizer)
    source = alignment_module.__file__
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == source else None

    sys.settrace(tracer)
    try:
        align(ids, counting, teacher_tok)
    finally:
        sys.settrace(None)
    return counting._tokenizer.decoded, lines


def test_the_alignments_work_grows_linearly_with_the_row(smollm2, sentencepiece) -> None:
    """Decoding every prefix decodes n^2/2 token ids, and the teacher's boundaries looked at
    every later token for each token: both four times the work at twice the length."""
    ids = student(smollm2, awkward_text(1500, seed=1))
    assert len(ids) >= 2048
    short, long = alignment_work(ids[:1024], smollm2, sentencepiece), alignment_work(ids[:2048], smollm2, sentencepiece)
    assert long[0] <= 2.2 * short[0] and long[0] <= 10 * 2048, (short, long)
    assert long[1] <= 2.2 * short[1], (short, long)


def test_the_alignment_workers_give_what_the_training_thread_gives(smollm2, sentencepiece) -> None:
    """A batch of sampled replies (awkward text, and one the teacher cannot encode) through
    the bridge with two alignment workers: the same teacher rows, spans and failed row as
    aligned in the training thread, computed in two other processes."""
    import os

    import torch

    from lightning_unified import batch as F
    from lightning_unified.teachers.tokenizers import TokenizerBridge

    replies = [student(smollm2, awkward_text(60, seed=s)) + [smollm2.eos_token_id] for s in range(5)]
    replies.append(student(smollm2, " a leading space, which this teacher's decoder drops"))
    width = max(len(r) for r in replies)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in replies])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    batch = {F.RESPONSE_IDS: ids, F.RESPONSE_MASK: mask, F.PROMPTS: ["Say something."] * len(replies),
             F.SAMPLED: True}
    here = TokenizerBridge(smollm2, sentencepiece).rows(batch, "cpu")
    bridge = TokenizerBridge(smollm2, sentencepiece, workers=2)
    try:
        there = bridge.rows(batch, "cpu")
        workers = {p.pid for p in bridge.pool._executor._processes.values()}
    finally:
        bridge.close()
    assert len(workers) == 2 and os.getpid() not in workers
    assert [a.spans for a in there.alignments] == [a.spans for a in here.alignments]
    assert torch.equal(there.response_ids, here.response_ids) and torch.equal(there.unknown, here.unknown)
    assert [f.row for f in there.failed] == [f.row for f in here.failed] == [5], here.failed
