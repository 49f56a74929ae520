"""``clusterlm.files``: an atomic write is synced (file, then directory), and a write the disk
refuses (full, over quota, read-only, not permitted) is one line that names the file, the device
and the fix, removes its temporary file and leaves the old file as it was."""

from __future__ import annotations

import errno
import os

import pytest
from small_disk import failing_os_write, make_read_only, small_tmpfs

from clusterlm.files import (
    DiskError,
    atomic_write,
    atomic_write_json,
    atomic_write_with,
    disk_error,
)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_atomic_write_syncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "a.json", "{}")
    assert (
        len(synced) == 2
        and synced[0].startswith(str(tmp_path / ".a.json."))
        and synced[1] == str(tmp_path)
    )
    synced.clear()
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    atomic_write_with(tmp_path / "c.png", lambda tmp: tmp.write_bytes(b"png"))
    assert synced[1::2] == [str(tmp_path)] * 2 and len(synced) == 4
    assert (tmp_path / "c.png").read_bytes() == b"png" and sorted(os.listdir(tmp_path)) == [
        "a.json",
        "b.json",
        "c.png",
    ]


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on"),
        (errno.EDQUOT, "disk quota exceeded on"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied writing"),
    ],
)
def test_a_refused_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code, words):
    target = tmp_path / "calibration.json"
    atomic_write(target, "old\n")
    failing_os_write(monkeypatch, code, allowed=1000)  # the disk fills partway through the file
    with pytest.raises(DiskError) as caught:
        atomic_write(target, "x" * 5000, setting="--out")
    monkeypatch.undo()
    message = one_line(caught.value)
    assert words in message and str(target) in message and "--out" in message
    assert (
        isinstance(caught.value, OSError) and caught.value.errno == code
    )  # still an OSError to callers
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["calibration.json"]


def test_a_library_writing_by_path_fails_the_same_way(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def savefig(tmp):
        tmp.write_bytes(b"half a plo")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(DiskError, match="no space left on"):
        atomic_write_with(target, savefig)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["plot.png"]


def test_other_errors_pass_through_unchanged(tmp_path):
    assert disk_error(OSError(errno.EIO, "I/O error"), tmp_path) is None
    assert disk_error(ValueError("no"), tmp_path) is None
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, "a directory is not a file")


def test_a_real_full_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        atomic_write(disk / "state.json", "old\n")
        with pytest.raises(DiskError) as caught:
            atomic_write(disk / "state.json", "x" * (1 << 20))
        message = one_line(caught.value)
        assert f"no space left on {disk} writing" in message
        assert (disk / "state.json").read_text() == "old\n" and os.listdir(disk) == ["state.json"]


def test_a_real_read_only_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        atomic_write(disk / "state.json", "old\n")
        make_read_only(disk)
        with pytest.raises(DiskError) as caught:
            atomic_write(disk / "state.json", "new\n", setting="training.out_dir")
        message = one_line(caught.value)
        assert "read-only file system" in message and "training.out_dir" in message
        assert (disk / "state.json").read_text() == "old\n" and os.listdir(disk) == ["state.json"]
