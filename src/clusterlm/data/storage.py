"""Storage through fsspec: input sources, staged (atomic) writes, and a local cache for remote
shards.

Every path the data layer takes is a local path or any URL fsspec opens (``memory://``, ``file://``,
``s3://`` when its driver is installed, ...).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from clusterlm.errors import UserError
from clusterlm.files import fsync_path

_HASH_CHUNK = 1 << 20
_GLOB_CHARS = frozenset("*?[")


def url_to_fs(url: str | os.PathLike[str]) -> tuple[AbstractFileSystem, str]:
    """The filesystem behind a local path or URL, and the path within it."""
    try:
        return fsspec.core.url_to_fs(os.fspath(url))
    except ImportError as err:
        raise UserError(
            f"{os.fspath(url)} needs a storage driver that is not installed ({err}); install it "
            "(for s3://: `pip install 'clusterlm[s3]'`)"
        ) from None


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def shared_between_processes(fs: AbstractFileSystem) -> bool:
    """Whether another process sees what this one sees on ``fs`` (not so for ``memory://``)."""
    return not isinstance(fs, MemoryFileSystem)


def display_name(fs: AbstractFileSystem, path: str) -> str:
    """A path as users wrote it: plain for local files, a full URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, name: str) -> str:
    """``name`` inside directory ``root`` (fsspec paths always use ``/``)."""
    return f"{root.rstrip('/')}/{name}"


def sha256_of_file(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceFile:
    """One input file, read through ``clusterlm.data.lines`` (a bounded line at a time, never
    whole); ``name`` is how the manifest records it."""

    fs: AbstractFileSystem
    path: str
    name: str


def resolve_sources(specs: Iterable[str]) -> list[SourceFile]:
    """Input files in command-line order; directories (recursive) and globs expand sorted.

    Hidden files and directories (names starting with ``.``) inside a directory are skipped.
    """
    files: list[SourceFile] = []
    for spec in specs:
        fs, path = url_to_fs(spec)
        if _GLOB_CHARS & set(path):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not paths:
                raise UserError(f"input pattern {spec!r} matches no files; check the pattern")
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if not _is_hidden(p[len(path) :]))
            if not paths:
                raise UserError(
                    f"input directory {spec} holds no files; add text files or pass others"
                )
        elif fs.isfile(path):
            paths = [path]
        else:
            raise UserError(f"input {spec} does not exist; check the path")
        files += [SourceFile(fs, p, display_name(fs, p)) for p in paths]
    return files


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith(".") for part in relative_path.split("/") if part)


class StagedDir:
    """Files written under temporary names in their target directory, renamed into place on commit.

    Until ``commit`` the directory's visible contents do not change, so a crash (or an exception)
    leaves the last good state; ``discard`` removes the temporary files.
    """

    def __init__(self, fs: AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root
        self._staged: dict[str, str] = {}  # final name -> temporary path

    def path(self, name: str) -> str:
        return join(self.root, name)

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        """Write ``name``; it becomes visible only on ``commit``."""
        tmp = self.path(f".{name}.tmp-{os.getpid()}")
        self._staged[name] = tmp
        if is_local(self.fs):
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the rename can publish them
        else:
            with self.fs.open(tmp, "wb") as f:
                yield f

    def commit(self, last: str, remove: Iterable[str] = ()) -> None:
        """Publish the staged files, ``last`` after everything else (it vouches for the others).

        The old ``last`` goes first, so no moment shows it describing files that changed under it;
        ``remove`` names obsolete files to delete.
        """
        if self.fs.exists(self.path(last)):
            self.fs.rm_file(self.path(last))
        for name, tmp in self._staged.items():
            if name != last:
                self._publish(tmp, self.path(name))
        for name in remove:
            if name not in self._staged and self.fs.exists(self.path(name)):
                self.fs.rm_file(self.path(name))
        self._publish(self._staged[last], self.path(last))
        self._staged.clear()
        if is_local(self.fs):
            fsync_path(self.root)  # the renames are on disk before anyone is told the data is ready

    def discard(self) -> None:
        for tmp in self._staged.values():
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
        self._staged.clear()

    def _publish(self, tmp: str, final: str) -> None:
        if is_local(self.fs):
            os.replace(tmp, final)
        else:
            self.fs.mv(tmp, final)


def default_cache_dir() -> Path:
    """Where copies of remote shards live: ``$CLUSTERLM_CACHE`` or ``~/.cache/clusterlm``."""
    return Path(os.environ.get("CLUSTERLM_CACHE", Path.home() / ".cache" / "clusterlm"))
