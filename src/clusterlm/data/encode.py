"""Tokenizing for `prepare`: documents cut into pieces, encoded in order, optionally in a process
pool whose workers read, clean and encode whole documents (``encode_documents``).

Pieces end at a line break between two non-space characters, where neither tokenizer built here
merges across, so encoding a document piece by piece gives the same ids as encoding it whole, and
one big file still spreads over the workers.
"""

from __future__ import annotations

import multiprocessing
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from clusterlm.data.documents import Document
from clusterlm.data.storage import shared_between_processes
from clusterlm.data.tokenizer import Tokenizer

# A worker reads and encodes a whole document up to this many characters (its ids are sent back
# at once); a larger one is read here and sent to the workers a piece at a time.
WHOLE_DOCUMENT_CHARS = 1 << 24
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


class Encoded(NamedTuple):
    document: int  # position of the document among those encoded
    last: bool  # the document's final piece
    chars: int  # characters of the piece
    ids: np.ndarray


def encode_documents(
    tokenizer: Tokenizer,
    documents: Sequence[Document],
    dtype: np.dtype,
    workers: int,
    piece_chars: int,
) -> Iterator[Encoded]:
    """Every document's pieces (``pieces``) with their token ids, in order. With several workers,
    a worker reads, cleans and encodes a whole document, unless the document is larger than
    ``WHOLE_DOCUMENT_CHARS`` or on a filesystem only this process sees: then this process reads
    it and the workers encode its pieces. At most a few tasks are in flight per worker."""
    if workers == 1:
        for index, document in enumerate(documents):
            for piece in pieces([document.text()], piece_chars):
                ids = _encode_array(tokenizer, piece.text, dtype.str)
                yield Encoded(index, piece.last, len(piece.text), ids)
        return
    # "spawn": a forked child would inherit the tokenizer library's thread pool in an unknown state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer.to_json(),)
    ) as pool:
        pending: deque[_Task] = deque()
        for task in _tasks(pool, documents, dtype.str, piece_chars):
            pending.append(task)
            if len(pending) >= 2 * workers:
                yield from _results(pending.popleft())
        for task in pending:
            yield from _results(task)


# A task: the document, whether it ends the document, and its pieces' (characters, ids).
_Task = tuple[int, bool, "Future[list[tuple[int, np.ndarray]]]"]


def _tasks(
    pool: ProcessPoolExecutor, documents: Sequence[Document], dtype: str, piece_chars: int
) -> Iterator[_Task]:
    for index, document in enumerate(documents):
        if document.chars <= WHOLE_DOCUMENT_CHARS and shared_between_processes(document.source.fs):
            yield index, True, pool.submit(_encode_document_in_worker, document, dtype, piece_chars)
            continue
        for piece in pieces([document.text()], piece_chars):
            yield index, piece.last, pool.submit(_encode_piece_in_worker, piece.text, dtype)


def _results(task: _Task) -> Iterator[Encoded]:
    index, ends, future = task
    parts = future.result()
    for k, (chars, ids) in enumerate(parts):
        yield Encoded(index, ends and k == len(parts) - 1, chars, ids)


def _encode_array(tokenizer: Tokenizer, text: str, dtype: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=dtype)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_json)


def _encode_piece_in_worker(text: str, dtype: str) -> list[tuple[int, np.ndarray]]:
    assert _worker_tokenizer is not None, "worker started without a tokenizer"
    return [(len(text), _encode_array(_worker_tokenizer, text, dtype))]


def _encode_document_in_worker(
    document: Document, dtype: str, piece_chars: int
) -> list[tuple[int, np.ndarray]]:
    assert _worker_tokenizer is not None, "worker started without a tokenizer"
    return [
        (len(piece.text), _encode_array(_worker_tokenizer, piece.text, dtype))
        for piece in pieces([document.text()], piece_chars)
    ]
