"""``data.mix``: several prepared datasets, each drawn with a weight.

The key's value is text, ``DIR=WEIGHT,DIR=WEIGHT`` (the weight after the last ``=``), so it is
given on the command line like any key (``--data.mix "data/a=0.7,data/b=0.3"``) and saved in a
checkpoint's config as it was given. A TOML file may write it as an array of tables,
``mix = [{dir = "data/a", weight = 0.7}, {dir = "data/b", weight = 0.3}]``, which ``mix_text``
turns into that text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from clusterlm.errors import UserError

_FIX = 'write it as "DIR=WEIGHT,DIR=WEIGHT" or, in TOML, [{dir = "...", weight = 0.5}, ...]'


@dataclass(frozen=True)
class MixSource:
    """One prepared dataset of a mix (local directory or fsspec URL) and its weight."""

    dir: str
    weight: float


def parse_mix(text: str) -> tuple[MixSource, ...]:
    """The datasets of a ``data.mix`` value (empty text: no mix); refuses an empty entry, a weight
    that is not a positive finite number, and a dataset named twice."""
    if not text.strip():
        return ()
    sources = []
    for entry in text.split(","):
        directory, equals, weight = entry.strip().rpartition("=")
        if not equals or not directory.strip():
            raise UserError(f"data.mix entry {entry.strip()!r} has no DIR=WEIGHT; {_FIX}")
        sources.append(MixSource(directory.strip(), _weight(directory.strip(), weight)))
    dirs = [s.dir for s in sources]
    twice = next((d for d in dirs if dirs.count(d) > 1), None)
    if twice is not None:
        raise UserError(f"data.mix names {twice} twice; give each dataset once, with one weight")
    return tuple(sources)


def _weight(directory: str, text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(
            f"data.mix weight {text!r} of {directory} is not a number; {_FIX}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(
            f"data.mix weight {value} of {directory} must be a positive number; give every "
            "dataset a weight above 0, or leave the dataset out"
        )
    return value


def mix_text(key: str, tables: list[Any]) -> str:
    """A TOML array of ``{dir, weight}`` tables as ``data.mix`` text (checked by ``parse_mix``)."""
    if not tables:
        raise UserError(f"{key} is an empty list; name at least one dataset, or drop the key")
    entries = []
    for table in tables:
        if not isinstance(table, dict) or set(table) != {"dir", "weight"}:
            raise UserError(f"{key} entry {table!r} must be a table with dir and weight; {_FIX}")
        directory, weight = table["dir"], table["weight"]
        if not isinstance(directory, str) or "," in directory:
            raise UserError(f"{key} dir {directory!r} must be a path without commas; {_FIX}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(f"{key} weight {weight!r} of {directory} must be a number; {_FIX}")
        entries.append(f"{directory}={weight!r}")
    text = ",".join(entries)
    parse_mix(text)
    return text
