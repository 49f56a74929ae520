"""How a config key is declared: ``setting``, the dataclass field every section's keys use, which
carries the key's meaning and allowed values for ``--help`` and the reference page."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config key: its default, its meaning (``--help`` and the reference print it) and, for a
    string, the values it may take."""
    return field(default=default, metadata={"help": help, "choices": choices})
