"""Reading the planner's data files (``configs/plan/*.toml``): arrays of tables, every field named
in one line when it is missing or of the wrong type, and layouts and models built from their own
keys."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clusterlm.errors import UserError
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.layout import Layout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_DIR = Path(__file__).resolve().parents[3] / "configs" / "plan"


def load_rows(
    path: str | Path,
    array: str,
    fields: Mapping[str, type],
    optional: Mapping[str, type] | None = None,
) -> list[dict[str, Any]]:
    """The ``[[array]]`` tables of a TOML file, each checked to have ``fields`` of their types, and
    ``optional`` ones of theirs where present."""
    path = Path(path)
    try:
        rows = tomllib.loads(path.read_text()).get(array)
    except OSError:
        raise UserError(f"data file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: no [[{array}]] tables")
    for i, row in enumerate(rows, 1):
        where = f"{path} [[{array}]] #{i} ({row.get('name', 'unnamed')})"
        for key, kind in {**fields, **(optional or {})}.items():
            if key not in row:
                if key not in fields:
                    continue
                raise UserError(
                    f"{where}: missing field {key!r}; every entry needs {', '.join(fields)}"
                )
            number = kind is float and isinstance(row[key], int) and not isinstance(row[key], bool)
            if not (isinstance(row[key], kind) or number):
                raise UserError(f"{where}: {key} must be a {kind.__name__}, got {row[key]!r}")
        row["_where"] = where
    return rows


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` for a dataclass, naming an unknown key and the place it came from."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown {cls.__name__} key {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    return cls(**values)


def model_from(row: dict[str, Any]) -> ModelArgs:
    return build(ModelArgs, row["model"], row["_where"] + " model")


def layout_from(row: dict[str, Any]) -> Layout:
    return build(Layout, row["layout"], row["_where"] + " layout")
