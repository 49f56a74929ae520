"""Tokenizing for `prepare`: documents cut into pieces, encoded in order, optionally in a process
pool.

Pieces end at a line break between two non-space characters, where neither tokenizer built here
merges across, so encoding a document piece by piece gives the same ids as encoding it whole, and
one big file still spreads over the workers.
"""

from __future__ import annotations

import multiprocessing
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from clusterlm.data.tokenizer import Tokenizer

_PIECE_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")


class Piece(NamedTuple):
    document: int  # position of the document among the inputs
    last: bool  # the document's final piece
    text: str


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut at safe line breaks into parts of about ``max_chars``.

    A part runs longer when no break fits.
    """
    parts, start = [], 0
    while len(text) - start > max_chars:
        cut = _PIECE_BOUNDARY.search(text, start + max_chars)
        if cut is None:
            break
        parts.append(text[start : cut.start()])
        start = cut.start()
    parts.append(text[start:])
    return parts


def pieces(documents: Iterable[Iterable[str]], max_chars: int) -> Iterator[Piece]:
    """Every document's text (given in any pieces, e.g. lines) in the parts ``split_text`` cuts
    it into, without holding more of it than the part being cut; an empty document gives none."""
    for index, text in enumerate(documents):
        part = None
        for following in _cut(text, max_chars):
            if part is not None:
                yield Piece(index, False, part)
            part = following
        if part is not None:
            yield Piece(index, True, part)


def _cut(text: Iterable[str], max_chars: int) -> Iterator[str]:
    """``split_text("".join(text), max_chars)`` (less a final empty part) as the text streams in.
    A part ends at the first break at least ``max_chars`` into it; a break depends only on the two
    characters before it and the one after, so each piece is searched once, with the two
    characters before it in front."""
    held: list[str] = []  # the current part so far
    size, before = 0, ""  # its length; the two characters before the next piece
    for piece in text:
        while piece:
            window = before + piece
            cut = _PIECE_BOUNDARY.search(window, len(before) + max(0, max_chars - size))
            if cut is None:
                held.append(piece)
                size, before = size + len(piece), window[-2:]
                break
            end = cut.start() - len(before)
            yield "".join(held) + piece[:end]
            held, size, before, piece = [], 0, window[cut.start() - 2 : cut.start()], piece[end:]
    if size:
        yield "".join(held)


def encode_all(
    tokenizer: Tokenizer, pieces: Iterable[Piece], dtype: np.dtype, workers: int
) -> Iterator[tuple[Piece, np.ndarray]]:
    """Each piece with its token ids, in input order; at most a few pieces in flight per worker."""
    if workers == 1:
        for piece in pieces:
            yield piece, _encode_array(tokenizer, piece.text, dtype.str)
        return
    # "spawn": a forked child would inherit the tokenizer library's thread pool in an unknown state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer.to_json(),)
    ) as pool:
        pending: deque[tuple[Piece, Future[np.ndarray]]] = deque()
        for piece in pieces:
            pending.append((piece, pool.submit(_encode_in_worker, piece.text, dtype.str)))
            if len(pending) >= 2 * workers:
                piece, future = pending.popleft()
                yield piece, future.result()
        for piece, future in pending:
            yield piece, future.result()


def _encode_array(tokenizer: Tokenizer, text: str, dtype: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=dtype)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_json)


def _encode_in_worker(text: str, dtype: str) -> np.ndarray:
    assert _worker_tokenizer is not None, "worker started without a tokenizer"
    return _encode_array(_worker_tokenizer, text, dtype)
