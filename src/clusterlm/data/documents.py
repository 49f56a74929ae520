"""Input documents read as streams: checked, measured and hashed in one pass, their cleaned text
read again piece by piece when it is needed. No document, however large, is held whole.

``scan_document`` reads a source once for its size, sha256, UTF-8 check, line lengths and
Gutenberg layout (``clusterlm.data.cleaning``), and once more to count the characters of its
cleaned text; ``Document.text`` yields that text (``clean_text`` of the decoded file) in pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from clusterlm.data.cleaning import Layout, LayoutScan, cleaned
from clusterlm.data.lines import Reading, bounded_lines, open_source
from clusterlm.data.manifest import SourceInfo
from clusterlm.data.quality import CleaningOptions, Profile, Profiler, normalized
from clusterlm.data.storage import SourceFile
from clusterlm.errors import UserError

_BOM = "\ufeff"


@dataclass(frozen=True)
class Document:
    source: SourceFile
    info: SourceInfo  # size and sha256 of the file's bytes
    layout: Layout
    chars: int  # characters of cleaned text (0: the document holds no text)
    max_line_bytes: int
    normalize: bool = False  # NFC, control characters removed (``clusterlm.data.quality``)
    profile: Profile | None = None  # measured for cleaning and deduplication
    alphabet: str = ""  # every character of the text, sorted (what a char tokenizer needs)

    def text(self) -> Iterator[str]:
        """The cleaned text, read again from the source, in pieces (none when there is no text)."""
        if not self.chars:
            return
        with open_source(self.source) as stream:
            yield from self._cleaned(stream)
        yield "\n"

    def _cleaned(self, stream) -> Iterator[str]:
        pieces = cleaned(self._lines(stream), self.layout)
        return normalized(pieces) if self.normalize else pieces

    def _lines(self, stream) -> Iterator[str]:
        return decoded_lines(
            bounded_lines(stream, self.source.name, self.max_line_bytes), self.source.name
        )


def scan_document(
    source: SourceFile, max_line_bytes: int, cleaning: CleaningOptions | None = None
) -> Document:
    """``source`` checked (readable, UTF-8, no line over ``max_line_bytes``) and measured; with
    ``cleaning``, normalised if it says so and profiled."""
    scan = LayoutScan()
    with open_source(source) as stream:
        reading = Reading(stream)
        for number, line in enumerate(
            decoded_lines(bounded_lines(reading, source.name, max_line_bytes), source.name)
        ):
            scan.feed(number, line)
    info = SourceInfo(source.name, reading.size, reading.hexdigest())
    normalize = cleaning is not None and cleaning.normalize
    measured = Document(source, info, scan.layout(), 1, max_line_bytes, normalize)
    profiler = Profiler(signature=cleaning.dedup == "near") if cleaning is not None else None
    chars, has_text, seen = 0, False, {"\n"}
    with open_source(source) as stream:
        for piece in measured._cleaned(stream):
            chars += len(piece)
            has_text = has_text or not piece.isspace()
            seen.update(piece)
            if profiler is not None:
                profiler.feed(piece)
    if profiler is not None and has_text:
        profiler.feed("\n")  # the text ends as ``Document.text`` ends it
    return dataclasses.replace(
        measured,
        chars=chars + 1 if has_text else 0,
        profile=profiler.profile() if profiler is not None else None,
        alphabet="".join(sorted(seen)) if has_text else "",
    )


def decoded_lines(lines: Iterable[bytes], name: str) -> Iterator[str]:
    """Each line decoded from UTF-8 (a byte order mark dropped, ``\\r\\n`` made ``\\n``); a bad
    byte is one line naming the file and the byte's offset in it."""
    offset = 0
    for number, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"{name} is not UTF-8 text (bad byte at offset {offset + err.start}); "
                "convert it to UTF-8 or leave it out"
            ) from err
        offset += len(raw)
        if number == 0:
            line = line.removeprefix(_BOM)
        if line.endswith("\r\n"):
            line = line[:-2] + "\n"
        yield line
