"""`clusterlm prepare` on a disk that fills up or is read-only: one `error:` line naming the
output and the fix, no temporary file left, and the data prepared before still intact."""

from __future__ import annotations

import builtins
import errno
import json

import pytest
from small_disk import make_read_only, small_tmpfs

from clusterlm import cli
from clusterlm.data import storage
from clusterlm.data.manifest import verify_shards
from clusterlm.data.task import load_task


def prepare_cli(*args) -> int:
    return cli.main(["prepare", *map(str, args), "--workers", "1"])


def error_line(capsys) -> str:
    """The one error line, after the progress bar's (no traceback)."""
    *progress, line = capsys.readouterr().err.rstrip("\n").split("\n")
    assert line.startswith("error: ") and all(
        part.lstrip("\r").startswith("tokenizing") for part in progress
    )
    return line


def disk_filling_after(monkeypatch, allowed: int, code: int = errno.ENOSPC) -> None:
    """The staged files of a prepared directory take ``allowed`` bytes, then writes fail."""
    written, real_open = [0], builtins.open

    class Filling:
        def __init__(self, file):
            self._file = file

        def write(self, data) -> int:
            if written[0] + len(data) > allowed:
                raise OSError(code, "refused")
            written[0] += len(data)
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(storage, "open", lambda *a, **k: Filling(real_open(*a, **k)), raising=False)


@pytest.fixture
def bigger_corpus(tmp_path):
    path = tmp_path / "bigger.txt"
    path.write_text(
        "".join(f"Line {i} of a longer text that fills the disk.\n" for i in range(3000))
    )
    return path


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on"),
        (errno.EROFS, "read-only file system"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_a_refused_write_keeps_the_previous_data(
    tmp_path, corpus_dir, bigger_corpus, tree, monkeypatch, capsys, code, words
):
    out = tmp_path / "out"
    assert prepare_cli(corpus_dir, "--out", out) == 0
    before = tree(out)
    capsys.readouterr()
    disk_filling_after(monkeypatch, 5000, code)
    assert prepare_cli(bigger_corpus, "--out", out, "--force", "--shard-tokens", 1000) == 2
    line = error_line(capsys)
    assert words in line and str(out) in line and "--out" in line
    assert tree(out) == before  # no temporary left, nothing replaced
    verify_shards(out)


def test_a_full_disk_leaves_no_new_directory(tmp_path, bigger_corpus, monkeypatch, capsys):
    disk_filling_after(monkeypatch, 100)
    assert prepare_cli(bigger_corpus, "--out", tmp_path / "new") == 2
    assert "no space left on" in error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_a_task_on_a_full_disk_keeps_the_previous_task(tmp_path, tree, monkeypatch, capsys):
    rows = [
        {"text": f"example {i} " * 20, "label": i % 2, "split": ("train", "val", "test")[i % 3]}
        for i in range(60)
    ]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "task"
    assert prepare_cli("--task", f"jsonl:{tmp_path / 'task.jsonl'}", "--out", out) == 0
    before = tree(out)
    capsys.readouterr()
    disk_filling_after(monkeypatch, 200)
    assert (
        prepare_cli(
            "--task", f"jsonl:{tmp_path / 'task.jsonl'}", "--out", out, "--seed", 3, "--force"
        )
        == 2
    )
    assert "no space left on" in error_line(capsys)
    assert tree(out) == before
    load_task(str(out))


def test_a_real_full_disk(tmp_path, corpus_dir, bigger_corpus, tree, capsys):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "out"
        assert prepare_cli(corpus_dir, "--out", out) == 0
        before = tree(out)
        capsys.readouterr()
        assert prepare_cli(bigger_corpus, "--out", out, "--force") == 2
        assert (
            f"no space left on {disk} writing {out}; free space there or point --out elsewhere"
            in error_line(capsys)
        )
        assert tree(out) == before
        verify_shards(out)


def test_a_real_read_only_disk(tmp_path, corpus_dir, bigger_corpus, tree, capsys):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "out"
        assert prepare_cli(corpus_dir, "--out", out) == 0
        before = tree(out)
        make_read_only(disk)
        capsys.readouterr()
        assert prepare_cli(bigger_corpus, "--out", out, "--force") == 2
        assert "is on a read-only file system" in error_line(capsys)
        assert tree(out) == before
        assert prepare_cli(bigger_corpus, "--out", disk / "fresh") == 2
        assert "is on a read-only file system" in error_line(capsys)
