"""The English–Spanish Bible: chapter checks on made-up verses, and the real modules."""

import sys

import pytest
from sword_modules import require_bible

from clusterlm.data.bible import ENGLISH, TEST_BOOKS, book_split, check_chapters, read_module
from clusterlm.errors import UserError


def _chapter(book: str, lengths: list[tuple[int, int]]) -> tuple[dict, dict]:
    english = {f"{book}.1.{i + 1}": "e" * a for i, (a, _) in enumerate(lengths)}
    spanish = {f"{book}.1.{i + 1}": "s" * b for i, (_, b) in enumerate(lengths)}
    return english, spanish


def test_aligned_chapters_are_kept():
    english, spanish = _chapter("Ruth", [(40, 38), (120, 110), (60, 57), (90, 88)])
    assert check_chapters(english, spanish) == {}


def test_a_missing_reference_drops_its_chapter():
    english, spanish = _chapter("Jonah", [(40, 38), (120, 110), (60, 57)])
    spanish["Jonah.1.3"] = ""
    assert check_chapters(english, spanish) == {"Jonah.1": "Jonah.1.3 missing on one side"}


def test_verses_shifted_by_one_drop_their_chapter():
    lengths = [40, 200, 30, 150, 20, 90]
    english = {f"Job.1.{i + 1}": "e" * n for i, n in enumerate(lengths)}
    shifted = [40, *lengths[1:-1][1:], 90, 100]  # verse 2 merged away: the rest come one early
    spanish = {f"Job.1.{i + 1}": "s" * n for i, n in enumerate(shifted)}
    dropped = check_chapters(english, spanish)
    assert list(dropped) == ["Job.1"] and "neighbouring verse" in dropped["Job.1"]


def test_books_are_split_whole():
    assert {book_split(b) for b in TEST_BOOKS} == {"test"}
    assert book_split("Gen") == "train" and book_split("Titus") == "val"


def test_a_missing_module_names_its_package():
    with pytest.raises(UserError, match="apt-get install sword-text-x"):
        read_module("noSuchModule", "sword-text-x")


def test_a_python_without_the_binding_names_python3_sword():
    with pytest.raises(UserError, match="apt-get install python3-sword"):
        read_module(*ENGLISH, python=sys.executable)  # this venv's Python has no Sword


def test_the_real_modules_align_after_dropping_misaligned_chapters():
    bible = require_bible()
    assert 30_000 < len(bible.pairs) < 31_084
    for chapter in ("Jonah.1", "Jonah.2", "Num.13", "1Chr.21", "1Kgs.22", "Judg.14", "Job.40"):
        assert chapter in bible.dropped
    text = {p.ref: (p.english, p.spanish) for p in bible.pairs}
    assert text["John.3.16"][0].startswith("For God so loved the world")
    assert text["Gen.2.12"][1] == (
        "Y el oro de aquella tierra es bueno: hay allí también bdelio y piedra cornerina."
    )
    assert not any("<" in e or "<" in s or "¶" in e or "\\" in e for e, s in text.values())
