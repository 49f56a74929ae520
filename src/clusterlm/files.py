"""Local files written whole or not at all, and their checksums.

Every file the project writes outside a prepared dataset (checkpoint metadata, calibrations,
emitted configs, reports, plots, caches) goes through ``atomic_write``: the bytes land in a
temporary file beside the target, which is then renamed over it, so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterlm.errors import UserError


def check_output_path(path: str | Path, what: str, directory: bool = True) -> None:
    """Fail with one line naming ``what`` (the option) when ``path``, a directory (or with
    ``directory=False`` a file) to be written, cannot be: it is a file (a directory), or a file
    stands where one of its parent directories should be."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{what} {path} is a {'file' if directory else 'directory'}; choose a new path")
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise UserError(f"{what} {path} lies under {parent}, which is a file; choose a path in a directory")


def temporary_sibling(path: str | Path) -> Path:
    """A unique hidden name in ``path``'s directory (same file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically, creating the parent directory; returns the path."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))


def atomic_write_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file (a library that writes by path: savefig, ...), which
    then replaces ``path``; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, payload: Any, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n")


def exclusive_write_json(path: str | Path, payload: Any) -> bool:
    """Create ``path`` holding ``payload`` only if no file is there; True when this call created
    it. The JSON is written whole to a temporary sibling first and then hard-linked into place,
    so the file appears complete or not at all, and of two writers exactly one succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive creation, then the bytes
            try:
                with open(path, "x") as f:
                    f.write(tmp.read_text())
            except FileExistsError:
                return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
