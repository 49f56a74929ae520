"""Shared fixtures: a tiny corpus on disk and a clean in-memory filesystem."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

# Three short documents with blank lines, tabs, runs of spaces and non-ASCII text.
TINY_DOCUMENTS = {
    "a.txt": (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    )
    * 6,
    "b.txt": "ROMEO:\n\tBut soft, what light through yonder window breaks?\n  It is the east.\n"
    * 8,
    "sub/c.txt": "Ünïcödé — naïve café, 日本語 and emoji 😀.\nLast line without much.\n" * 5,
}


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, text in TINY_DOCUMENTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def memory_fs():
    """The process-wide ``memory://`` filesystem, emptied before and after the test."""
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


def read_tree(root: Path) -> dict[str, bytes] | None:
    """Every file under ``root`` by relative path, or None if ``root`` does not exist."""
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def tree():
    """``read_tree`` as a fixture, for comparing a directory before and after a command."""
    return read_tree
