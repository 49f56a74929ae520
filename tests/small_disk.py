"""Disks that refuse writes, for the tests of what a full or read-only disk does.

``small_tmpfs`` mounts a real tmpfs of a few KiB (a real ENOSPC) and can remount it read-only (a
real EROFS); mounting needs root, so without it the test skips, and with ``CI=true`` such a skip is
a failure. ``failing_os_write`` makes ``os.write`` fail partway through, for everyone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a skip is a failure)")
    pytest.skip(reason)


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        _unavailable(f"cannot mount a tmpfs: {result.stderr.strip()}")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) and unmounted afterwards."""
    if os.geteuid() != 0:
        _unavailable("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def make_read_only(path: Path) -> None:
    """Remount the ``small_tmpfs`` at ``path`` read-only (its files stay readable)."""
    _mount("-o", "remount,ro", str(path))


def failing_os_write(monkeypatch, code: int = errno.ENOSPC, allowed: int = 0) -> None:
    """``os.write`` writes ``allowed`` bytes, then a partial write, then raises
    ``OSError(code)``."""
    real_write, written = os.write, [0]

    def write(fd: int, data) -> int:
        room = allowed - written[0]
        if room <= 0:
            raise OSError(code, os.strerror(code))
        count = real_write(fd, bytes(data)[:room])
        written[0] += count
        return count

    monkeypatch.setattr(os, "write", write)
