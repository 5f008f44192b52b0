"""Span alignment of two tokenizations on awkward text: leading spaces, digits split
differently, byte-fallback characters, an end-of-turn token, a non-canonical student
tokenization, and characters the teacher cannot encode (named). The student is SmolLM2's
real tokenizer; the teachers are small real tokenizers built here."""

from __future__ import annotations

import pytest

from lightning_unified.data.alignment import AlignmentError, align
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
