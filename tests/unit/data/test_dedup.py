"""Filters and deduplication on the embedded corpus cut into passages, with planted exact and near
duplicates: every exact one removed, at least 90% of the near ones at Jaccard >= 0.8, under 1% of
the originals, and never a pair well below the threshold."""

from __future__ import annotations

import random
import unicodedata

import pytest

from clusterlm.data.corpus import clean_text, embedded_corpus
from clusterlm.data.dedup import Removal, acceptance_cut, lsh_bands, select
from clusterlm.data.quality import CleaningOptions, Profiler, normalize_text, shingles

PASSAGE_LINES = 60


@pytest.fixture(scope="module")
def passages() -> list[str]:
    """The embedded plays cut into passages of PASSAGE_LINES lines (about 2,000 documents)."""
    out = []
    for source in embedded_corpus():
        lines = clean_text(open(source.path, encoding="utf-8-sig").read()).splitlines(True)
        out += ["".join(lines[i : i + PASSAGE_LINES]) for i in range(0, len(lines), PASSAGE_LINES)]
    return [p for p in out if len(shingles(p)) >= 50]


def profile(text: str, signature: bool = True):
    profiler = Profiler(signature)
    profiler.feed(normalize_text(text))
    return profiler.profile()


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def near_copy(text: str, rng: random.Random) -> str:
    """``text`` with a few words replaced, for a Jaccard similarity of about 0.75 to 0.95."""
    words = text.split()
    for _ in range(int(len(words) * rng.uniform(0.004, 0.028))):
        words[rng.randrange(len(words))] = f"planted{rng.randrange(10**6)}"
    return "\n".join(" ".join(words[i : i + 9]) for i in range(0, len(words), 9)) + "\n"


def test_planted_duplicates_are_removed_and_originals_kept(passages):
    rng = random.Random(0)
    originals = len(passages)
    exact = [rng.randrange(originals) for _ in range(100)]
    near = [rng.randrange(originals) for _ in range(300)]
    # Exact copies differ before normalisation: decomposed accents, a stray control character.
    documents = list(passages)
    documents += [unicodedata.normalize("NFD", passages[i]) + "\x07" for i in exact]
    near_texts = [near_copy(passages[i], rng) for i in near]
    documents += near_texts
    order = list(range(len(documents)))
    rng.shuffle(order[originals:])  # the copies come after their originals, in any order
    options = CleaningOptions(normalize=True, dedup="near")
    decisions = select([profile(documents[i]) for i in order], options)
    removed = {order[k]: d for k, d in enumerate(decisions) if d is not None}

    assert all(removed.get(originals + k) for k in range(len(exact)))
    assert all(removed[originals + k].reason == "exact_duplicate" for k in range(len(exact)))
    similar = [
        originals + len(exact) + k
        for k, i in enumerate(near)
        if jaccard(passages[i], near_texts[k]) >= 0.8
    ]
    assert len(similar) >= 200
    found = sum(1 for i in similar if i in removed)
    assert found >= 0.9 * len(similar), (found, len(similar))
    false = [i for i in removed if i < originals]
    assert len(false) < 0.01 * originals, [documents[i][:80] for i in false]


def test_never_removes_a_pair_well_below_the_threshold(passages):
    rng = random.Random(1)
    for _ in range(150):
        text = rng.choice(passages)
        words = text.split()
        for _ in range(int(len(words) * 0.1)):  # Jaccard about 0.3 to 0.5
            words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
        other = " ".join(words)
        if jaccard(text, other) > 0.6:
            continue
        decisions = select([profile(text), profile(other)], CleaningOptions(dedup="near"))
        assert decisions == [None, None]


def test_filters_and_their_order():
    options = CleaningOptions(min_chars=10, max_chars=40, max_non_letter=0.3, dedup="exact")
    texts = ["short\n", "x" * 50, "12345 67890 !!!!\n", "a fine line of text\n"]
    texts += ["a fine line of text\n", " \n"]
    decisions = select([profile(t, signature=False) for t in texts], options)
    assert decisions == [
        Removal("too_short"),
        Removal("too_long"),
        Removal("non_letter"),
        None,
        Removal("exact_duplicate", 3),
        Removal("empty"),
    ]


def test_bands_find_a_pair_at_the_cut_almost_surely():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_bands(threshold)
        cut = acceptance_cut(threshold)
        assert bands * rows <= 256 and 1 - (1 - cut**rows) ** bands >= 0.99
        assert threshold - 0.07 < cut < threshold
