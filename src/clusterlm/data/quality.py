"""Cleaning in `prepare`: Unicode normalisation, and what a document is measured by to be kept or
removed (``clusterlm.data.dedup`` decides).

Normalisation is Unicode NFC with control characters removed (all of category Cc but tab and line
feed). It runs on whole lines, a run of them at a time: a line feed composes with nothing, so
normalising runs of lines one by one gives the normalised whole, and no document is held whole.
``Profiler`` measures a document's normalised text as it streams past: characters, letters and other
non-space characters, the sha256 (exact duplicates), and a MinHash signature of its word 5-grams
(near duplicates).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clusterlm.errors import UserError

if TYPE_CHECKING:
    from datasketch import MinHash

DEDUP_MODES = ("none", "exact", "near")
SHINGLE_WORDS = 5  # near duplicates compare sets of word 5-grams
NUM_PERM = 256  # MinHash permutations: the estimate's standard error is about 0.025 at 0.8
MINHASH_SEED = 1
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WORD = re.compile(r"\w+")
_BATCH = 4096  # shingles hashed at a time
_RUN_CHARS = 1 << 16  # text normalised at a time, at least (whole lines)


@dataclass(frozen=True)
class CleaningOptions:
    """What `prepare` does to documents before tokenizing them (every default: nothing)."""

    normalize: bool = False  # NFC, control characters removed
    min_chars: int = 0  # fewer characters: removed (0: no limit)
    max_chars: int = 0  # more characters: removed (0: no limit)
    max_non_letter: float = 1.0  # a larger share of non-space characters not letters: removed
    dedup: str = "none"  # "exact": identical documents; "near": also near duplicates
    near_threshold: float = 0.8  # Jaccard similarity of word 5-grams at which a document goes

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < 0:
            raise UserError("--min-chars and --max-chars must be >= 0 (0 = no limit)")
        if self.max_chars and self.max_chars < self.min_chars:
            raise UserError(
                f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}; "
                "raise it, or use 0 for no limit"
            )
        if not 0 <= self.max_non_letter <= 1:
            raise UserError(
                f"--max-non-letter {self.max_non_letter} must be in [0, 1] (1 = no limit)"
            )
        if self.dedup not in DEDUP_MODES:
            raise UserError(f"--dedup {self.dedup!r} must be one of {', '.join(DEDUP_MODES)}")
        if not 0 < self.near_threshold < 1:
            raise UserError(
                f"--near-threshold {self.near_threshold} must be in (0, 1); 0.8 is usual"
            )

    @property
    def active(self) -> bool:
        """Whether any document could change or go (else `prepare` runs as without cleaning)."""
        return self != CleaningOptions()


def normalize_text(text: str) -> str:
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def normalized(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces' text, normalised in runs of whole lines (module docstring)."""
    held: list[str] = []
    size = 0
    for piece in pieces:
        held.append(piece)
        size += len(piece)
        if size < _RUN_CHARS:
            continue
        text = "".join(held)
        cut = text.rfind("\n") + 1
        if cut:
            held, size = [text[cut:]], len(text) - cut
            yield normalize_text(text[:cut])
        else:
            held = [text]
    if held and (text := normalize_text("".join(held))):
        yield text


@dataclass(frozen=True)
class Profile:
    """What a document is kept or removed by."""

    chars: int
    letters: int
    others: int  # non-space characters that are not letters
    sha256: str  # of the (normalised) text
    signature: np.ndarray | None  # MinHash of the word 5-grams (near dedup only)

    @property
    def non_letter_share(self) -> float:
        return self.others / max(1, self.letters + self.others)


class Profiler:
    """``feed`` a document's text in pieces, then ``profile``."""

    def __init__(self, signature: bool) -> None:
        self.chars = self.letters = self.others = 0
        self._digest = hashlib.sha256()
        self._minhash = _new_minhash() if signature else None
        self._tail = ""  # a word the last piece may have cut
        self._words: list[str] = []  # the last words, for shingles spanning pieces
        self._shingles: list[bytes] = []  # not yet signed
        self._seen_shingle = False

    def feed(self, text: str) -> None:
        self.chars += len(text)
        self._digest.update(text.encode("utf-8"))
        letters = sum(map(str.isalpha, text))
        self.letters += letters
        self.others += len(text) - letters - sum(map(str.isspace, text))
        if self._minhash is not None:
            self._add_words(text)

    def profile(self) -> Profile:
        signature = None
        if self._minhash is not None:
            self._add([self._tail] if self._tail else [])
            if not self._seen_shingle and self._words:  # under 5 words: the words are a shingle
                self._shingles.append(" ".join(self._words).encode("utf-8"))
            self._flush(self._minhash)
            signature = self._minhash.hashvalues.copy()
        return Profile(self.chars, self.letters, self.others, self._digest.hexdigest(), signature)

    def _add_words(self, text: str) -> None:
        words = _WORD.findall(self._tail + text.casefold())
        self._tail = words.pop() if words and _WORD.match(text[-1:]) else ""
        self._add(words)

    def _add(self, words: list[str]) -> None:
        """The shingles ``words`` complete, signed in batches; the last words kept for the next."""
        words = self._words + words
        count = len(words) - SHINGLE_WORDS + 1
        if count <= 0:
            self._words = words
            return
        self._seen_shingle = True
        self._shingles += [
            " ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8") for i in range(count)
        ]
        self._words = words[count:]
        if len(self._shingles) >= _BATCH and self._minhash is not None:
            self._flush(self._minhash)

    def _flush(self, minhash: MinHash) -> None:
        if self._shingles:
            minhash.update_batch(self._shingles)
        self._shingles = []


def _new_minhash() -> MinHash:
    # Imported here: datasketch loads scipy, which processes that only tokenize never need.
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=zlib.crc32, scheme="affine32")


def shingles(text: str) -> set[bytes]:
    """The word 5-grams a ``Profiler`` signs, as an exact set (for tests against exact Jaccard)."""
    words = _WORD.findall(text.casefold())
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {
        " ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8")
        for i in range(len(words) - SHINGLE_WORDS + 1)
    }
