"""A checkpoint save on a full or read-only disk, in line or in the background: one line naming
the checkpoint directory and the fix, no temporary directory left, and the earlier checkpoint
still complete, verified and named by ``latest``."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from small_disk import failing_os_write, make_read_only, small_tmpfs

from clusterlm.checkpoint import LATEST, CheckpointReader, CheckpointWriter, tensor_storage, verify
from clusterlm.files import DiskError


def save(writer: CheckpointWriter, root, step: int, size: int = 1000):
    tensors = {"model": {"w": torch.full((size,), float(step))}}
    path = writer.save(
        root, step, tensors, {"step": step}, keep_last=5, files={"tokenizer.json": b"{}"}
    )
    writer.wait()
    return path


def refused(writer: CheckpointWriter, root, step: int, size: int = 1000) -> str:
    with pytest.raises(DiskError) as caught:
        save(writer, root, step, size)
    message = str(caught.value)
    assert "\n" not in message and str(root) in message and "training.out_dir" in message
    return message


def assert_only_the_first_checkpoint(root, first) -> None:
    assert sorted(os.listdir(root)) == [LATEST, first.name]  # no ".step_*.tmp" left
    assert verify(first) == {"step": 1}
    assert json.loads((root / LATEST).read_text()) == {"checkpoint": first.name}
    loaded = {"model": {"w": torch.zeros(1000)}}
    CheckpointReader(first).read(loaded)
    assert torch.equal(loaded["model"]["w"], torch.ones(1000))


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "background"])
@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "no space left on"), (errno.EROFS, "read-only file system")]
)
def test_metadata_refused(tmp_path, monkeypatch, background, code, words):
    root = tmp_path / "checkpoints"
    writer = CheckpointWriter(background)
    first = save(writer, root, 1)
    failing_os_write(monkeypatch, code)  # trainer.json and complete.json are written with os.write
    assert words in refused(writer, root, 2)
    monkeypatch.undo()
    assert_only_the_first_checkpoint(root, first)
    assert save(writer, root, 3).name == "step_00000003"  # the next save, with room again, works
    writer.close()


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "background"])
def test_tensor_files_refused(tmp_path, monkeypatch, background):
    root = tmp_path / "checkpoints"
    writer = CheckpointWriter(background)
    first = save(writer, root, 1)

    class FullFile:  # a tensor file whose every write the disk refuses
        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115 - closed by __exit__

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def tell(self):
            return self.file.tell()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_storage, "open", FullFile, raising=False)
    assert "no space left on" in refused(writer, root, 2)
    monkeypatch.undo()
    assert_only_the_first_checkpoint(root, first)
    writer.close()


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "background"])
def test_a_real_full_disk(tmp_path, background):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        root = disk / "checkpoints"
        writer = CheckpointWriter(background)
        first = save(writer, root, 1)
        assert f"no space left on {disk}" in refused(writer, root, 2, size=1 << 20)
        assert_only_the_first_checkpoint(root, first)
        writer.close()


def test_a_real_read_only_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        root = disk / "checkpoints"
        writer = CheckpointWriter()
        first = save(writer, root, 1)
        make_read_only(disk)
        assert "read-only file system" in refused(writer, root, 2)
        assert_only_the_first_checkpoint(root, first)
