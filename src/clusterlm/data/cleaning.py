"""Project Gutenberg cleanup a line at a time: ``clean_text`` (``clusterlm.data.corpus``) of a
document of any size, which is read twice and never held whole.

The first pass (``LayoutScan``) finds, line by line, what ``clean_text``'s patterns find in the
whole text: the first footer line, the last header line before it, and the last ``>>`` before it
(where the last licence notice can end). The second (``cleaned``) yields the text between header
and footer with the notices cut out and the line breaks around it removed, in pieces whose
concatenation is ``clean_text``'s result without its final ``\\n``. The lines are decoded and have
``\\n`` line endings; a pattern that runs over several lines (``***``, blank lines, then the rest
of a marker) is followed across them. ``tests/unit/data/test_line_cleaning.py`` checks the two
agree on many generated documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from clusterlm.data.corpus import FOOTER_START, HEADER_END

NOTICE_OPEN = "<<THIS ELECTRONIC VERSION"
NOTICE_CLOSE = ">>"
# The rest of a footer or header marker whose "***" ended an earlier line.
_FOOTER_RUNS_ON = re.compile(
    r"\s*END OF (?:THE |THIS )?(?:PROJECT GUTENBERG|E-?TEXT)", re.IGNORECASE
)
_HEADER_RUNS_ON = re.compile(r"\s*START OF (?:THIS|THE) PROJECT GUTENBERG", re.IGNORECASE)
_FOOTER_STARS = re.compile(r"[ \t]*\*{3}\s*")  # a whole line: a footer's "***" alone
_CHUNK = 1 << 20

Position = tuple[int, int]  # (line, column)


@dataclass(frozen=True)
class Layout:
    """Where a document's text lies among its lines."""

    first: int  # the first line after the last header
    stop: int | None  # the footer's line (None: the text has no footer)
    last_close: Position | None  # the last ">>" before the footer


class LayoutScan:
    """``feed`` every line in order, then ``layout``."""

    def __init__(self) -> None:
        self._footer: tuple[int, tuple[int | None, Position | None]] | None = None
        self._header: int | None = None  # the last line a header match ended on
        self._open_header: tuple[int, bool] | None = None  # (line ending in "***", matches alone)
        self._stars: tuple[int, tuple[int | None, Position | None]] | None = (
            None  # footer "***" line
        )
        self._close: Position | None = None

    def feed(self, number: int, line: str) -> None:
        if self._footer is not None:
            return
        if self._stars is not None:
            if _FOOTER_RUNS_ON.match(line):
                self._footer = self._stars
                return
            if not line.isspace():
                self._stars = None
        if FOOTER_START.match(line):
            self._footer = (number, self._cut())
            return
        if _FOOTER_STARS.fullmatch(line):
            self._stars = (number, self._cut())
        self._feed_header(number, line)
        found = line.rfind(NOTICE_CLOSE)
        if found >= 0:
            self._close = (number, found)

    def layout(self) -> Layout:
        stop, (header, close) = self._footer if self._footer else (None, self._cut())
        return Layout(0 if header is None else header + 1, stop, close)

    def _cut(self) -> tuple[int | None, Position | None]:
        """The last header line and the last ">>" if the text ended before the current line."""
        header = self._header
        if self._open_header is not None and self._open_header[1]:
            header = self._open_header[0]
        return header, self._close

    def _feed_header(self, number: int, line: str) -> None:
        if self._open_header is not None:
            if line.isspace():
                return
            start, alone = self._open_header
            self._open_header = None
            if _HEADER_RUNS_ON.match(line):
                self._header = number  # the match runs from ``start`` to the end of this line
                return
            if alone:
                self._header = start
        alone = HEADER_END.match(line) is not None
        if line.endswith("\n") and line.rstrip().endswith("***"):
            self._open_header = (number, alone)  # the regex tries the run-on match first
        elif alone:
            self._header = number


def cleaned(lines: Iterable[str], layout: Layout) -> Iterator[str]:
    """The text between header and footer without licence notices and without line breaks at
    either end (``clean_text`` less its final ``\\n``), in pieces."""
    body = (
        (number, line)
        for number, line in enumerate(lines)
        if number >= layout.first and (layout.stop is None or number < layout.stop)
    )
    return _strip_line_breaks(_without_notices(body, layout.last_close))


def _without_notices(
    lines: Iterable[tuple[int, str]], last_close: Position | None
) -> Iterator[str]:
    """The lines without ``<<THIS ELECTRONIC VERSION...>>[ \\t]*\\n*`` (``_NOTICE_BLOCK``)."""
    inside, after, verbatim = False, False, False
    for number, line in lines:
        if after and line == "\n":  # the line breaks after a notice go with it
            continue
        after, start = False, 0
        while start < len(line):
            if inside:
                end = line.find(NOTICE_CLOSE, start)
                if end < 0:
                    break
                inside, start = False, end + len(NOTICE_CLOSE)
                while start < len(line) and line[start] in " \t":
                    start += 1
                if line[start:] == "\n":
                    after = True
                    break
                continue
            found = -1 if verbatim else line.find(NOTICE_OPEN, start)
            if (
                found >= 0
                and last_close is not None
                and last_close >= (number, found + len(NOTICE_OPEN))
            ):
                if found > start:
                    yield line[start:found]
                inside, start = True, found + len(NOTICE_OPEN)
                continue
            verbatim = verbatim or found >= 0  # no ">>" after this opening: none after the others
            yield line[start:]
            break


def _strip_line_breaks(pieces: Iterable[str]) -> Iterator[str]:
    """``"".join(pieces).strip("\\n")``, in pieces."""
    started, held = False, 0  # held: line breaks not yet known to be followed by text
    for piece in pieces:
        if not started:
            piece = piece.lstrip("\n")
            if not piece:
                continue
            started = True
        text = piece.rstrip("\n")
        if not text:
            held += len(piece)
            continue
        while held > _CHUNK:
            yield "\n" * _CHUNK
            held -= _CHUNK
        yield "\n" * held + text
        held = len(piece) - len(text)
