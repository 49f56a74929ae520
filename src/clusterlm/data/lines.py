"""Input read a line at a time, each line at most ``--max-line-bytes``: no input file, however
large, and no line of one, gets into memory whole.

``bounded_lines`` reads blocks and cuts them into lines, so it holds at most one block and one
line; ``Reading`` hashes and counts the bytes as they pass, so a file is checked, measured and
hashed in a single pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from clusterlm.data.storage import SourceFile
from clusterlm.errors import UserError

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB
_BLOCK = 1 << 20


def line_too_long(number: int, name: str, limit: int) -> UserError:
    return UserError(
        f"line {number} of {name} is over --max-line-bytes ({limit} bytes); "
        "split it or raise the limit"
    )


def bounded_lines(stream: BinaryIO | Reading, name: str, limit: int) -> Iterator[bytes]:
    """The lines of ``stream`` with their ``\\n`` (the last one perhaps without); a line of more
    than ``limit`` bytes (its line break not counted) raises ``line_too_long`` as soon as that
    many bytes of it are read."""
    number, pending = 0, bytearray()  # pending: the start of a line whose end is not read yet
    while block := stream.read(_BLOCK):
        first, newline, rest = block.partition(b"\n")
        pending += first
        if not newline:
            if len(pending) > limit:
                raise line_too_long(number + 1, name, limit)
            continue
        lines = rest.split(b"\n")
        tail = lines.pop()
        for line in (pending, *lines):
            number += 1
            if len(line) > limit:
                raise line_too_long(number, name, limit)
            yield bytes(line) + b"\n"
        pending = bytearray(tail)
        if len(pending) > limit:
            raise line_too_long(number + 1, name, limit)
    if pending:
        yield bytes(pending)


class Reading:
    """A binary stream that hashes and counts what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def open_source(source: SourceFile) -> Iterator[BinaryIO]:
    """``source`` open for reading; a failure to open or read it is one line naming it."""
    try:
        with source.fs.open(source.path, "rb") as stream:
            yield stream
    except OSError as err:
        raise UserError(
            f"cannot read {source.name}: {err}; check that it is a readable file"
        ) from err
