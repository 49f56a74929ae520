"""Tokenizing for `prepare`: documents cut into pieces, encoded in order, optionally in a process pool.

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
    """``text`` cut at safe line breaks into parts of about ``max_chars`` (longer if no break fits)."""
    parts, start = [], 0
    while len(text) - start > max_chars:
        cut = _PIECE_BOUNDARY.search(text, start + max_chars)
        if cut is None:
            break
        parts.append(text[start : cut.start()])
        start = cut.start()
    parts.append(text[start:])
    return parts


def pieces(documents: Iterable[str], max_chars: int) -> Iterator[Piece]:
    """Every document's text in pieces of about ``max_chars``; an empty document gives none."""
    for index, text in enumerate(documents):
        parts = split_text(text, max_chars) if text else []
        for j, part in enumerate(parts):
            yield Piece(index, j == len(parts) - 1, part)


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
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(tokenizer.to_json(),)) as pool:
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
