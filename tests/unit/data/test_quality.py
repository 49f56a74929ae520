"""Normalisation and document profiles: line-at-a-time equals whole, and MinHash estimates
tracking exact Jaccard similarity of word 5-grams."""

from __future__ import annotations

import random
import unicodedata

import numpy as np
import pytest

from clusterlm.data import quality
from clusterlm.data.quality import CleaningOptions, Profiler, normalize_text, normalized, shingles
from clusterlm.errors import UserError

TEXT = "Café\u0301 nai\u0308ve\x07 line\tone\r\nsecond\x00 line e\u0301\n\x1bthird\u200b line\n"


def cut(text: str, rng: random.Random) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 8)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def test_normalisation_is_nfc_without_control_characters():
    out = normalize_text(TEXT)
    assert out == unicodedata.normalize("NFC", out)
    assert "e\u0301" not in out and "é" in out and "ï" in out
    assert "\x07" not in out and "\x00" not in out and "\x1b" not in out and "\r" not in out
    assert "\t" in out and out.count("\n") == 3
    assert "\u200b" in out  # a format character, not a control character: kept


@pytest.mark.parametrize("run_chars", [1 << 16, 1, 7])
def test_normalising_pieces_equals_normalising_the_whole(monkeypatch, run_chars):
    monkeypatch.setattr(quality, "_RUN_CHARS", run_chars)
    rng = random.Random(0)
    for _ in range(200):
        pieces = cut(TEXT * 3, rng)
        assert "".join(normalized(pieces)) == normalize_text(TEXT * 3)


def profile_of(text: str, pieces: int = 1, seed: int = 0):
    profiler = Profiler(signature=True)
    for piece in cut(text, random.Random(seed)) if pieces > 1 else [text]:
        profiler.feed(piece)
    return profiler.profile()


def words(n: int, rng: random.Random) -> list[str]:
    vocabulary = [f"w{i}" for i in range(2000)]
    return [rng.choice(vocabulary) for _ in range(n)]


def test_a_profile_does_not_depend_on_how_the_text_is_cut():
    text = " ".join(words(500, random.Random(1))) + ", a word cut-in half.\n"
    whole = profile_of(text)
    for seed in range(5):
        piecewise = profile_of(text, pieces=8, seed=seed)
        assert np.array_equal(whole.signature, piecewise.signature)
        assert (whole.chars, whole.letters, whole.others, whole.sha256) == (
            piecewise.chars,
            piecewise.letters,
            piecewise.others,
            piecewise.sha256,
        )


def test_letters_and_other_characters_are_counted():
    profile = Profiler(signature=False)
    profile.feed("ab1 ?é\n")
    p = profile.profile()
    assert (p.chars, p.letters, p.others, p.signature) == (7, 3, 2, None)
    assert p.non_letter_share == pytest.approx(0.4)


def test_minhash_estimates_track_exact_jaccard():
    rng = random.Random(2)
    errors = []
    for _ in range(60):
        base = words(400, rng)
        edited = list(base)
        for _ in range(rng.randint(0, 60)):
            edited[rng.randrange(len(edited))] = rng.choice(["x", "y", "z"]) + str(rng.random())
        a, b = " ".join(base), " ".join(edited)
        exact = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
        estimate = float(np.mean(profile_of(a).signature == profile_of(b).signature))
        errors.append(estimate - exact)
    assert abs(np.mean(errors)) < 0.01 and np.std(errors) < 0.04  # unbiased; 256 permutations


def test_short_documents_have_one_shingle():
    assert shingles("Two words") == {b"two words"}
    assert profile_of("Two words").signature is not None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(min_chars=-1), "must be >= 0"),
        (dict(min_chars=10, max_chars=5), "below --min-chars"),
        (dict(max_non_letter=1.5), r"must be in \[0, 1\]"),
        (dict(dedup="fuzzy"), "must be one of none, exact, near"),
        (dict(near_threshold=1.0), r"must be in \(0, 1\)"),
    ],
)
def test_bad_cleaning_options_are_one_line(options, message):
    with pytest.raises(UserError, match=message):
        CleaningOptions(**options)
