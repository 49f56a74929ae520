"""Local files written whole or not at all, the names a directory may hold, and their checksums.

Every file the project writes outside a prepared dataset (checkpoint metadata, calibrations,
emitted configs, reports, plots, caches) goes through ``atomic_write``: the bytes land in a
temporary file beside the target, are flushed to the disk, and the file is renamed over the
target and the directory synced, so a crash or a power cut leaves either the old file or the new
one, never half of one. A write that fails for want of space or permission raises ``DiskError``:
one line for the user, the temporary file removed and the old file as it was.

A name read from a file (a manifest's shard, a model index's weight file) is a plain name inside
its directory (``plain_name``): never a path that could leave it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from clusterlm.errors import UserError


def check_destination(out: Path) -> None:
    """Fail with one line when the ``--out`` directory ``out`` exists and holds anything: a command
    that writes a new directory never mixes its files with others'."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out directory or remove it")


def check_output_path(path: str | Path, what: str, directory: bool = True) -> None:
    """Fail with one line naming ``what`` (the option) when ``path``, a directory (or with
    ``directory=False`` a file) to be written, cannot be: it is a file (a directory), or a file
    stands where one of its parent directories should be."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UserError(
            f"{what} {path} is a {'file' if directory else 'directory'}; choose a new path"
        )
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise UserError(
                f"{what} {path} lies under {parent}, which is a file; choose a path in a directory"
            )


_SHA256 = re.compile(r"[0-9a-f]{64}")


class DiskError(UserError, OSError):
    """A write refused by the disk (full, over quota, read-only or not permitted): one line for
    the user, and still an ``OSError`` (with its ``errno``) for code that handles those."""

    path: str | None = None  # the file whose write was refused


def temporary_sibling(path: str | Path) -> Path:
    """A unique hidden name in ``path``'s directory (same file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | Path, data: bytes | str, setting: str = "the output") -> Path:
    """Write ``data`` to ``path`` atomically and durably, creating the parent directory; returns
    the path. ``setting`` names what the user changes to write elsewhere (in a ``DiskError``)."""
    payload = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    return _replace_with(Path(path), write, setting, synced=True)


def atomic_write_with(
    path: str | Path, write: Callable[[Path], object], setting: str = "the output"
) -> Path:
    """``write(tmp)`` fills a temporary file (a library that writes by path: savefig, ...), which
    is synced and then replaces ``path``; the temporary file is removed if anything fails."""
    return _replace_with(Path(path), write, setting, synced=False)


def atomic_write_json(
    path: str | Path, payload: Any, indent: int | None = 1, setting: str = "the output"
) -> Path:
    return atomic_write(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n", setting)


def _replace_with(path: Path, write: Callable[[Path], object], setting: str, synced: bool) -> Path:
    tmp = temporary_sibling(path)
    try:
        with disk_errors(path, setting):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            if not synced:
                fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        with suppress(OSError):  # a read-only file system refuses even this: nothing was made there
            tmp.unlink(missing_ok=True)
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file's bytes, or a directory's entries (a rename in it), to the disk. A file system
    that cannot sync a directory (some network and FUSE ones) is left to its own guarantees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (
            os.path.isdir(path) and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)
        ):
            raise
    finally:
        os.close(fd)


# --- failures of the disk, as one line


_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
DISK_ERRNOS = frozenset({*_FULL, *_DENIED})


def disk_error(
    err: BaseException, path: str | Path, setting: str = "the output"
) -> DiskError | None:
    """``err`` as one line naming ``path`` (what the user asked to write: the target, not a
    temporary beside it), the device and the fix when the disk refused a write (full, over quota,
    read-only, not permitted), else None. ``setting`` is what the user points elsewhere
    (``--out``, ``training.out_dir``)."""
    if not isinstance(err, OSError) or err.errno not in DISK_ERRNOS:
        return None
    if err.errno in _FULL:
        message = (
            f"{_FULL[err.errno]} on {mount_point(path)} writing {path}; "
            f"free space there or point {setting} elsewhere"
        )
    elif err.errno == errno.EROFS:
        message = (
            f"{path} is on a read-only file system ({mount_point(path)}); "
            f"point {setting} at a writable directory"
        )
    else:
        message = (
            f"permission denied writing {path}; "
            f"make its directory writable or point {setting} elsewhere"
        )
    error = DiskError(message)
    error.errno, error.path = err.errno, str(path)
    return error


@contextmanager
def disk_errors(path: str | Path, setting: str = "the output") -> Iterator[None]:
    """Raise an ``OSError`` of a refused write in the block as ``disk_error``'s one line (one
    already made, by a write inside the block, passes as it is)."""
    try:
        yield
    except DiskError:
        raise
    except OSError as err:
        mapped = disk_error(err, path, setting)
        if mapped is None:
            raise
        raise mapped from err


def mount_point(path: str | Path) -> str:
    """The mount point of the file system ``path`` is (or would be) on."""
    try:
        current = Path(os.path.abspath(path))
        while not current.exists() and current != current.parent:
            current = current.parent
        device = current.stat().st_dev
        while current != current.parent and current.parent.stat().st_dev == device:
            current = current.parent
        return str(current)
    except OSError:
        return str(Path(path).parent)


# --- names read from files


def is_plain_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside a directory: a non-empty string without
    ``/``, ``\\`` or NUL that is not ``.`` or ``..`` (so never absolute and never outside)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
    )


def plain_name(name: object, where: str, fix: str) -> str:
    """``name`` if it is a plain file name (``is_plain_name``); else a ``UserError`` saying that
    ``where`` (the file that holds the name) names it, and ``fix``."""
    if not is_plain_name(name):
        raise UserError(
            f"{where} names the file {name!r}, which is not a plain name inside its directory "
            f"(no /, \\, .., NUL or absolute path); {fix}"
        )
    return name  # type: ignore[return-value]


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 as this project writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


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
