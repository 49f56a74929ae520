"""A user's labelled examples as JSONL: one object per line, ``{"text": str, "label": str | int}``
and optionally ``"split": "train" | "val" | "test"`` (on every line or on none). Blank lines are
skipped. Every problem is reported with its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from clusterlm.data.task import TASK_SPLITS
from clusterlm.errors import UserError

_FIX = (
    'write one JSON object per line: {"text": "...", "label": "..." or 0, '
    'optional "split": "train"|"val"|"test"}'
)


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    text: str
    label: str | int
    split: str | None


def read_jsonl(name: str, lines: Iterable[bytes]) -> list[Record]:
    """The records of JSONL file ``name`` from its ``lines``.

    ``lines`` comes e.g. from ``clusterlm.data.lines.bounded_lines``; bad input raises UserError.
    """
    records = []
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            records.append(_record(name, number, raw))
    if not records:
        raise UserError(f"{name} holds no examples; {_FIX}")
    label_types = {type(r.label) for r in records}
    if len(label_types) > 1:
        first_str = next(r for r in records if isinstance(r.label, str))
        first_int = next(r for r in records if isinstance(r.label, int))
        raise UserError(
            f"labels in {name} mix strings and integers "
            f"(line {first_str.line}: {first_str.label!r}, "
            f"line {first_int.line}: {first_int.label!r}); use one type for every label"
        )
    with_split = [r for r in records if r.split is not None]
    if with_split and len(with_split) < len(records):
        missing = next(r for r in records if r.split is None)
        raise UserError(
            f'{name} line {missing.line} has no "split" but line {with_split[0].line} has one; '
            'give every line a "split" or none (then splits are drawn from --seed)'
        )
    return records


def json_object(where: str, raw: bytes, fix: str) -> dict:
    """Line ``raw`` (at ``where``) parsed as one JSON object; ``fix`` says what a line should be."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{where} is not UTF-8 (bad byte at offset {err.start}); convert the file to UTF-8"
        ) from err
    except json.JSONDecodeError as err:
        raise UserError(
            f"{where} is not valid JSON ({err.msg} at column {err.colno}); {fix}"
        ) from err
    except RecursionError:
        raise UserError(f"{where} nests arrays or objects too deeply to read; {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where} is not a JSON object; {fix}")
    return value


def _record(name: str, number: int, raw: bytes) -> Record:
    where = f"{name} line {number}"
    value = json_object(where, raw, _FIX)
    for key in ("text", "label"):
        if key not in value:
            raise UserError(f'{where} has no "{key}"; {_FIX}')
    text, label, split = value["text"], value["label"], value.get("split")
    if not isinstance(text, str) or not text:
        raise UserError(f'{where}: "text" must be a non-empty string; {_FIX}')
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise UserError(
            f'{where}: "label" {json.dumps(label)} must be a string or an integer; {_FIX}'
        )
    if split is not None and split not in TASK_SPLITS:
        raise UserError(
            f'{where}: "split" {split!r} is not one of {", ".join(TASK_SPLITS)}; fix or drop it'
        )
    return Record(number, text, label, split)
