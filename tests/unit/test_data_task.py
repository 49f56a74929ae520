"""Labelled tasks: the format and reader (clusterlm.data.task) and building them (plays, JSONL)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusterlm.data.manifest import TASK_KIND, TokenizerInfo, load_manifest
from clusterlm.data.storage import StagedDir, url_to_fs
from clusterlm.data.task import (
    TASK_FORMAT_VERSION,
    TASK_SPLITS,
    TaskManifest,
    is_task_dir,
    load_task,
    write_split,
)
from clusterlm.errors import UserError


def write_tiny_task(out) -> TaskManifest:
    """A hand-made three-split task: labels ("a", "b"), examples of 1..3 token ids."""
    out.mkdir()
    fs, root = url_to_fs(str(out))
    staged = StagedDir(fs, root)
    dtype = np.dtype("uint16")
    splits = {
        name: write_split(staged, name, [np.arange(1 + i % 3, dtype=dtype) + k for i in range(4)],
                          np.array([0, 1, 0, 1]), dtype, 2)
        for k, name in enumerate(TASK_SPLITS)
    }
    with staged.open("tokenizer.json") as f:
        f.write(b"{}")
    manifest = TaskManifest(
        format_version=TASK_FORMAT_VERSION, fingerprint="x", kind=TASK_KIND, source="test", sources=(),
        dtype="uint16", vocab_size=10, eot_id=None,
        tokenizer=TokenizerInfo("file", "tokenizer.json", "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
        labels=("a", "b"), split_rule="test", seed=0, val_fraction=0.1, test_fraction=0.1,
        passage_tokens=None, splits=splits,
    )
    with staged.open("manifest.json") as f:
        f.write(manifest.to_json().encode())
    staged.commit(last="manifest.json")
    return manifest


def test_reader_round_trip(tmp_path):
    manifest = write_tiny_task(tmp_path / "task")
    task = load_task(str(tmp_path / "task"))
    assert task.manifest == manifest and task.labels == ("a", "b") and is_task_dir(str(tmp_path / "task"))
    assert list(task.splits) == list(TASK_SPLITS)
    val = task.splits["val"]
    assert len(val) == 4 and val.offsets.dtype == np.int64 and val.labels.tolist() == [0, 1, 0, 1]
    assert val.example(2).tolist() == [1, 2, 3] and val.tokens.dtype == np.uint16
    assert manifest.splits["val"].label_counts == (2, 2)


def test_reader_detects_corruption_and_missing_files(tmp_path):
    write_tiny_task(tmp_path / "task")
    path = tmp_path / "task" / "train_tokens.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="train_tokens.bin .* corrupt: its sha256 differs"):
        load_task(str(tmp_path / "task"))
    load_task(str(tmp_path / "task"), verify=False)  # sizes still agree
    (tmp_path / "task" / "test_labels.bin").unlink()
    with pytest.raises(UserError, match="test_labels.bin .* corrupt: it is missing"):
        load_task(str(tmp_path / "task"), verify=False)


def test_corpus_and_task_directories_are_not_confused(tmp_path):
    write_tiny_task(tmp_path / "task")
    with pytest.raises(UserError, match="is a labelled task, not a language-modelling corpus"):
        load_manifest(tmp_path / "task")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"format_version": 1, "shard_tokens": 5}))
    assert not is_task_dir(str(corpus)) and not is_task_dir(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="is a language-modelling corpus, not a labelled task; run `clusterlm prepare --task"):
        load_task(str(corpus))
    with pytest.raises(UserError, match="no labelled task at"):
        load_task(str(tmp_path / "nothing"))
