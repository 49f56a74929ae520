"""The English–Spanish Bible corpus (``clusterlm prepare --task translation:bible-en-es``).

The King James Version (Debian's ``sword-text-kjv``) and the Reina-Valera 1909
(``sword-text-sparv``), both public domain, read offline from their SWORD modules and aligned by
OSIS verse reference. ``python3-sword`` is compiled for Debian's own interpreter, so the modules
are read by a child ``/usr/bin/python3`` running ``sword_dump.py``: that works whatever Python
(version, virtual environment) runs clusterlm, where importing the binding here would need the
same interpreter build.

Where the Spanish follows its own verse numbering the pairs are misaligned, so whole chapters are
dropped, each with its reason (``check_chapters``): a reference one side lacks, or verses whose
lengths fit a neighbouring verse of the other side better than their own (a shift).

Held-out data is split by book, so parallel passages never leak between splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from clusterlm.data.manifest import SourceInfo
from clusterlm.data.verse_text import clean_verse
from clusterlm.errors import UserError

DEBIAN_PYTHON = "/usr/bin/python3"
# (SWORD module, Debian package) of each side.
ENGLISH = ("engKJV2006eb", "sword-text-kjv")
SPANISH = ("spaRV1909eb", "sword-text-sparv")
BINDING_PACKAGE = "python3-sword"
# Whole books held out (OSIS names): the Gospel of John and three short narrative books for test,
# one narrative book and two letters for validation.
TEST_BOOKS = ("John", "Ruth", "Jonah", "Phlm")
VAL_BOOKS = ("Esth", "Titus", "Jas")
# A verse is off when its Spanish/English length ratio strays this far (in log) from the median;
# a chapter is dropped when SHIFTED_VERSES of them fit a neighbouring verse better by SHIFT_GAIN.
OFF_RATIO = 0.4
SHIFT_GAIN = 0.3
SHIFTED_VERSES = 2


@dataclass(frozen=True)
class VersePair:
    ref: str  # OSIS reference, e.g. "John.3.16"
    english: str
    spanish: str

    @property
    def book(self) -> str:
        return self.ref.split(".", 1)[0]


@dataclass(frozen=True)
class BibleCorpus:
    pairs: list[VersePair]  # in canon order, misaligned chapters removed
    dropped: dict[str, str]  # chapter ("Jonah.1") -> why it was dropped
    sources: tuple[SourceInfo, ...]  # each module's dump: its size and hash


def book_split(book: str) -> str:
    return "test" if book in TEST_BOOKS else "val" if book in VAL_BOOKS else "train"


def read_bible(python: str = DEBIAN_PYTHON) -> BibleCorpus:
    """Both modules read, cleaned and aligned; misaligned chapters dropped."""
    english, english_info = read_module(*ENGLISH, python=python)
    spanish, spanish_info = read_module(*SPANISH, python=python)
    dropped = check_chapters(english, spanish)
    pairs = [
        VersePair(ref, text, spanish[ref])
        for ref, text in english.items()
        if _chapter(ref) not in dropped and text and spanish.get(ref)
    ]
    return BibleCorpus(pairs, dropped, (english_info, spanish_info))


def read_module(
    module: str, package: str, python: str = DEBIAN_PYTHON
) -> tuple[dict[str, str], SourceInfo]:
    """Every verse of SWORD ``module`` (installed by Debian ``package``), cleaned, by reference."""
    script = Path(__file__).with_name("sword_dump.py")
    try:
        done = subprocess.run([python, str(script), module], capture_output=True, check=False)
    except OSError:
        done = None
    if done is None or done.returncode == 3:
        raise UserError(
            f"the SWORD Python binding is missing ({python} cannot import Sword); "
            f"install it: apt-get install {BINDING_PACKAGE}"
        )
    if done.returncode == 4:
        raise UserError(
            f"the SWORD module {module} is not installed; install it: apt-get install {package}"
        )
    if done.returncode != 0:
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise UserError(f"reading the SWORD module {module} failed ({' '.join(last)})")
    verses = {}
    for line in done.stdout.splitlines():
        verse = json.loads(line)
        verses[verse["ref"]] = clean_verse(verse["markup"])
    info = SourceInfo(f"sword:{module}", len(done.stdout), hashlib.sha256(done.stdout).hexdigest())
    return verses, info


def check_chapters(english: dict[str, str], spanish: dict[str, str]) -> dict[str, str]:
    """The chapters whose verses are misaligned, each with the reason (see the module docstring);
    references absent from one side, or empty there, count as missing."""
    chapters: dict[str, list[str]] = {}
    for ref in english.keys() | spanish.keys():
        chapters.setdefault(_chapter(ref), []).append(ref)
    logs = [
        math.log(len(spanish[r]) / len(english[r]))
        for r in english
        if english[r] and spanish.get(r)
    ]
    median = sorted(logs)[len(logs) // 2] if logs else 0.0
    dropped = {}
    for chapter, refs in chapters.items():
        refs.sort(key=_verse_number)
        missing = [r for r in refs if not english.get(r) or not spanish.get(r)]
        if missing:
            dropped[chapter] = f"{', '.join(missing)} missing on one side"
            continue
        shifted = _shifted_verses(
            [len(english[r]) for r in refs], [len(spanish[r]) for r in refs], median
        )
        if len(shifted) >= SHIFTED_VERSES:
            verses = ", ".join(refs[i].rsplit(".", 1)[1] for i in shifted)
            dropped[chapter] = f"verses {verses} fit a neighbouring verse's length better"
    order = {chapter: i for i, chapter in enumerate(dict.fromkeys(map(_chapter, english)))}
    return dict(sorted(dropped.items(), key=lambda item: order.get(item[0], len(order))))


def _shifted_verses(english: list[int], spanish: list[int], median: float) -> list[int]:
    """Indices of the verses whose length ratio is off, and better with a neighbouring verse."""

    def off(i: int, j: int) -> float:
        inside = 0 <= j < len(spanish)
        return abs(math.log(spanish[j] / english[i]) - median) if inside else math.inf

    return [
        i
        for i in range(len(english))
        if off(i, i) > OFF_RATIO and min(off(i, i - 1), off(i, i + 1)) < off(i, i) - SHIFT_GAIN
    ]


def _chapter(ref: str) -> str:
    return ref.rsplit(".", 1)[0]


def _verse_number(ref: str) -> int:
    return int(ref.rsplit(".", 1)[1])
