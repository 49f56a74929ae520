"""Tokenizers: exact round trips, sorted char vocabulary, hashing, save/load."""

from __future__ import annotations

import hashlib

import pytest
import tokenizers

from clusterlm.data.prepare import split_text
from clusterlm.data.tokenizer import EOT, Tokenizer
from clusterlm.errors import UserError

TRAINING = "Hello  world\n\n\tIndented line\r\nünïcödé 日本語 😀 e\u0301\n" * 20
UNSEEN_BY_CHAR = "Ωmega 🚀"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.bpe([TRAINING, "another document\n"], vocab_size=300)


def test_char_vocabulary_is_the_sorted_characters_then_eot():
    tok = Tokenizer.char([TRAINING])
    chars = sorted(set(TRAINING))
    assert tok.vocab_size == len(chars) + 1
    assert tok.encode("".join(chars)) == list(range(len(chars)))
    assert tok.eot_id == len(chars)


def test_char_round_trip_is_exact_one_token_per_character():
    tok = Tokenizer.char([TRAINING])
    text = "  \n\nworld  Hello\tünï 😀\r\n"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_char_rejects_unseen_characters():
    with pytest.raises(UserError, match="vocabulary"):
        Tokenizer.char([TRAINING]).encode(UNSEEN_BY_CHAR)


@pytest.mark.parametrize(
    "text", [TRAINING, UNSEEN_BY_CHAR, "  leading and trailing  \n", "a\r\nb\n\n\n"]
)
def test_bpe_round_trip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocabulary_and_eot(bpe):
    assert 257 <= bpe.vocab_size <= 300
    assert bpe.decode([bpe.eot_id]) == EOT


def test_bpe_training_is_deterministic(bpe):
    assert Tokenizer.bpe([TRAINING, "another document\n"], vocab_size=300).sha256 == bpe.sha256


def test_bpe_vocabulary_too_small():
    with pytest.raises(UserError, match="at least 257"):
        Tokenizer.bpe([TRAINING], vocab_size=100)


def test_save_load_keeps_bytes_and_hash(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bpe.sha256
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == bpe.sha256
    assert loaded.encode(TRAINING) == bpe.encode(TRAINING)
    # A plain tokenizers library object reads the file too.
    assert tokenizers.Tokenizer.from_file(str(path)).get_vocab_size() == bpe.vocab_size


def test_load_rejects_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


@pytest.mark.parametrize(
    "make", [lambda: Tokenizer.char([TRAINING]), lambda: Tokenizer.bpe([TRAINING], 300)]
)
def test_piecewise_encoding_equals_whole_encoding(make):
    tok = make()
    parts = split_text(TRAINING, max_chars=50)
    assert len(parts) > 3 and "".join(parts) == TRAINING
    assert [i for part in parts for i in tok.encode(part)] == tok.encode(TRAINING)
