"""Streaming a document gives what reading it whole gives: the line-by-line Gutenberg cleanup
equals ``clean_text`` on generated documents full of markers, notices and blank lines; the
streamed pieces equal ``split_text``'s; and spilling a long document's ids to a file changes no
byte of the prepared data."""

from __future__ import annotations

import random

import numpy as np
import pytest

from clusterlm.data import prepare as prepare_module
from clusterlm.data.cleaning import LayoutScan, cleaned
from clusterlm.data.corpus import clean_text
from clusterlm.data.encode import pieces, split_text
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.shards import DocumentIds

# Fragments that make the patterns of clean_text match, almost match, and run over lines.
FRAGMENTS = [
    "***",
    "*** ",
    "****",
    "  ***\t",
    "START OF THIS PROJECT GUTENBERG",
    " start of the project gutenberg ebook",
    "*** START OF THE PROJECT GUTENBERG EBOOK X ***",
    "*END*THE SMALL PRINT! x",
    "END OF THE PROJECT GUTENBERG",
    "\tEnd of this Etext",
    "END OF ETEXT",
    "*** END OF THIS PROJECT GUTENBERG",
    "<<THIS ELECTRONIC VERSION",
    ">>",
    ">>>",
    "<<",
    "word",
    "a b",
    " ",
    "\t",
    "\u2028",
    "\x0b",
    "\r",
    "\u00a0",
    "x>>y",
    ">> \t",
    "END OF",
]


def generated_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        lines = [
            "".join(rng.choice(FRAGMENTS) for _ in range(rng.choice([0, 0, 1, 1, 2, 3])))
            for _ in range(rng.randint(0, 12))
        ]
        documents.append(
            rng.choice(["\n", "\n", "\r\n"]).join(lines) + rng.choice(["", "\n", "\n\n"])
        )
    return documents


def streamed_clean_text(text: str) -> str:
    parts = text.replace("\r\n", "\n").split("\n")
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    scan = LayoutScan()
    for number, line in enumerate(lines):
        scan.feed(number, line)
    body = "".join(cleaned(lines, scan.layout()))
    return body + "\n" if body.strip() else ""


@pytest.mark.parametrize("seed", range(4))
def test_line_by_line_cleanup_equals_clean_text(seed):
    for text in generated_documents(1500, seed):
        assert streamed_clean_text(text) == clean_text(text), repr(text)


def test_line_by_line_cleanup_of_real_gutenberg_layouts():
    play = "ACT I.\n\nHam.\nTo be, or not to be: that is the question.\n"
    notice = "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS\nWITH PERMISSION.>>\n\n"
    modern = (
        "The Project Gutenberg EBook of Hamlet\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***"
        "\r\n\r\n"
        + play.replace("\n", "\r\n")
        + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    )
    old = (
        "The small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*END*\n\n"
        + notice
        + play
        + "\n"
        + notice
        + "Scene II.\n\nEnd of this Etext of Hamlet\n"
    )
    run_on = (
        "*** \n\nSTART OF THE PROJECT GUTENBERG X\nbody\n***\n \nEND OF THE PROJECT GUTENBERG\n"
    )
    for text in (
        modern,
        old,
        old.replace("***", "***\n\n"),
        run_on,
        play + "<<THIS ELECTRONIC VERSION, never closed\n",
    ):
        assert streamed_clean_text(text) == clean_text(text)
    assert streamed_clean_text(run_on) == "body\n"


def test_streamed_pieces_equal_split_text():
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(
            rng.choice(["a", "b", " ", "\n", "\n", "\t", "xy\n", "\nz"])
            for _ in range(rng.randint(0, 60))
        )
        max_chars = rng.randint(1, 12)
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(8, len(text)))))
        fragments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        streamed = list(pieces([fragments], max_chars))
        assert [p.text for p in streamed] == (split_text(text, max_chars) if text else [])
        assert [p.last for p in streamed] == [i == len(streamed) - 1 for i in range(len(streamed))]


def test_document_ids_read_back_from_memory_and_from_the_spill_file():
    ids = np.arange(1000, dtype=np.uint16)
    for limit in (10_000, 64, 1):
        held = DocumentIds(np.dtype(np.uint16), limit)
        for part in np.array_split(ids, 37):
            held.append(part)
        assert held.count == 1000
        for start, stop in ((0, 1000), (5, 6), (990, 1000), (300, 300)):
            chunks = list(held.read(start, stop))
            assert all(len(chunk) <= limit for chunk in chunks)
            np.testing.assert_array_equal(np.concatenate([*chunks, ids[:0]]), ids[start:stop])
        held.close()


def test_spilled_documents_and_small_pieces_give_identical_bytes(
    corpus_dir, tmp_path, tree, monkeypatch
):
    (corpus_dir / "gutenberg.txt").write_text(
        "header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        + "Verse one.\nVerse two.\n\n" * 200
        + "<<THIS ELECTRONIC VERSION IS\nCOPYRIGHT>>\n\n"
        + "More.\n" * 50
        + "*** END OF THIS PROJECT GUTENBERG\nfooter\n"
    )
    base = PrepareOptions(
        inputs=(str(corpus_dir),), out=str(tmp_path / "whole"), shard_tokens=500, workers=1
    )
    prepare(base)
    monkeypatch.setattr(prepare_module, "HELD_TOKENS", 7)  # every document's ids spill to a file
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 40)
    prepare(PrepareOptions(**{**base.__dict__, "out": str(tmp_path / "streamed")}))
    assert tree(tmp_path / "whole") == tree(tmp_path / "streamed")
