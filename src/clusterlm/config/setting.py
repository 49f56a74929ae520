"""How a config key is declared: ``setting``, the dataclass field every section's keys use, which
carries the key's meaning and allowed values for ``--help`` and the reference page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any


def setting(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    from_list: Callable[[str, list[Any]], Any] | None = None,
) -> Any:
    """A config key: its default, its meaning (``--help`` and the reference print it), for a
    string the values it may take, and how a TOML array given for it becomes its value (the key's
    name and the array in, the value out; without it an array is refused)."""
    return field(
        default=default, metadata={"help": help, "choices": choices, "from_list": from_list}
    )
