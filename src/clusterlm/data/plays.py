"""The embedded plays cut for classification: play -> scenes -> passages of whole lines.

A scene starts at a heading line such as ``SCENE I. Elsinore.``, ``Scene 2.`` or ``SCENE II.--A
room`` and runs to the next heading. Its text is its lines without the heading, act headings and
blank lines; the front matter before a play's first scene (title, persons of the play) belongs to
no scene. The sonnets and poems have no scene headings, so they are not plays here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clusterlm.data.corpus import EMBEDDED_SUFFIX
from clusterlm.data.storage import SourceFile
from clusterlm.data.tokenizer import Tokenizer

_SCENE_HEADING = re.compile(r"^\s*scene\s+(?:[ivxl]+|\d+)\b", re.IGNORECASE)
_ACT_HEADING = re.compile(r"^\s*act\s+(?:[ivxl]+|\d+)\b[.\s]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Play:
    name: str  # readable, from the file name: "hamlet", "henry_iv_part_1"
    scenes: tuple[tuple[str, ...], ...]  # each scene's text lines, with their "\n"


def play_name(source_name: str) -> str:
    return source_name.rsplit("/", 1)[-1].removesuffix(EMBEDDED_SUFFIX)


def scenes(text: str) -> list[tuple[str, ...]]:
    """The scenes of a play's cleaned text (module docstring); empty scenes are dropped."""
    found: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _SCENE_HEADING.match(line):
            found.append([])
        elif found and line.strip() and not _ACT_HEADING.match(line):
            found[-1].append(line)
    return [tuple(lines) for lines in found if lines]


def plays(sources: list[SourceFile], texts: list[str]) -> list[Play]:
    """The sources that are plays (have scenes), in source order.

    ``texts`` are the cleaned texts of ``sources``, in the same order.
    """
    found = [Play(play_name(s.name), tuple(scenes(t))) for s, t in zip(sources, texts, strict=True)]
    return [play for play in found if play.scenes]


def passages(
    line_ids: list[list[int]], passage_tokens: int, dtype: np.dtype
) -> Iterator[np.ndarray]:
    """Consecutive whole lines packed into passages of at most ``passage_tokens`` tokens; a longer
    line is cut into pieces of that size."""
    current: list[int] = []
    for ids in line_ids:
        if current and len(current) + len(ids) > passage_tokens:
            yield np.asarray(current, dtype=dtype)
            current = []
        while len(ids) > passage_tokens:
            yield np.asarray(ids[:passage_tokens], dtype=dtype)
            ids = ids[passage_tokens:]
        current += ids
    if current:
        yield np.asarray(current, dtype=dtype)


def scene_passages(
    play: Play, tokenizer: Tokenizer, passage_tokens: int, dtype: np.dtype
) -> list[list[np.ndarray]]:
    """Every scene of ``play`` as its list of token passages."""
    lines = [line for scene in play.scenes for line in scene]
    encoded = iter(tokenizer.encode_batch(lines))
    return [
        list(passages([next(encoded) for _ in scene], passage_tokens, dtype))
        for scene in play.scenes
    ]
