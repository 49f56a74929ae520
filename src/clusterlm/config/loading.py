"""Loading a config: TOML files and dotted overrides, each value coerced to its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterlm.config.checks import validate
from clusterlm.config.sections import Config
from clusterlm.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def all_keys() -> dict[str, dataclasses.Field]:
    """Every dotted key ('training.steps') with its dataclass field."""
    defaults = Config()
    return {
        f"{section.name}.{f.name}": f
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(defaults, section.name))
    }


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    hint = (
        f"; did you mean {close[0]!r}?" if close else "; `clusterlm train --help` lists every key"
    )
    return UserError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or fail naming the key."""
    kind = type(f.default)
    from_list = f.metadata.get("from_list")
    if from_list is not None and isinstance(value, list):  # a key TOML may give as an array
        value = from_list(key, value)
    if kind is str and isinstance(value, os.PathLike):  # a path given from Python
        value = os.fspath(value)
    try:
        if not isinstance(value, (str, int, float)):  # TOML arrays, tables, dates and times
            raise ValueError
        if kind is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except (ValueError, OverflowError):  # OverflowError: an integer key given inf or 1e999
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, "a string"
        )
        raise UserError(f"{key} must be {expected}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A new config: ``cfg`` with the dotted ``values`` coerced to their fields' types."""
    keys = all_keys()
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key not in keys:
            raise _unknown_key(key)
        section, name = key.split(".", 1)
        by_section.setdefault(section, {})[name] = _coerce(key, keys[key], value)
    sections = {
        name: dataclasses.replace(getattr(cfg, name), **fields)
        for name, fields in by_section.items()
    }
    return dataclasses.replace(cfg, **sections)


def _flatten_toml(tree: dict[str, Any], source: str) -> dict[str, Any]:
    flat = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{source}: top-level key {section!r} must be a [section] table")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; presets live in configs/*.toml")
    try:
        return _flatten_toml(tomllib.loads(path.read_bytes().decode("utf-8")), str(path))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save the config as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML ({err})") from None


def build_config(
    config_path: str | None,
    overrides: dict[str, Any],
    resolve: Callable[[Config, set[str]], Config] | None = None,
) -> Config:
    """The TOML file, then the dotted overrides, then ``resolve`` (given the keys the user set:
    values that come from outside the config, such as a pretrained model's shape, through
    ``clusterlm.interop.pretrained_shape.load_config``), then every check."""
    cfg = Config()
    explicit = set(overrides)
    if config_path:
        from_file = load_toml(config_path)
        cfg = apply_overrides(cfg, from_file)
        explicit |= set(from_file)
    cfg = apply_overrides(cfg, overrides)
    if resolve is not None:
        cfg = resolve(cfg, explicit)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. inside a checkpoint)."""
    return apply_overrides(Config(), _flatten_toml(tree, "saved config"))
