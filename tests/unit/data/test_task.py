"""Labelled tasks: the format and reader (clusterlm.data.task) and building them (plays, JSONL)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from clusterlm.data import task_prepare
from clusterlm.data.corpus import embedded_corpus
from clusterlm.data.curation import read_documents
from clusterlm.data.manifest import TASK_KIND, TokenizerInfo, load_manifest
from clusterlm.data.plays import passages, plays, scene_passages, scenes
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.storage import StagedDir, url_to_fs
from clusterlm.data.task import (
    TASK_FORMAT_VERSION,
    TASK_SPLITS,
    TaskManifest,
    group_splits,
    is_task_dir,
    load_task,
    write_split,
)
from clusterlm.data.task_prepare import PLAY_TASK, TaskOptions, prepare_task
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError


def write_tiny_task(out) -> TaskManifest:
    """A hand-made three-split task: labels ("a", "b"), examples of 1..3 token ids."""
    out.mkdir()
    fs, root = url_to_fs(str(out))
    staged = StagedDir(fs, root)
    dtype = np.dtype("uint16")
    splits = {
        name: write_split(
            staged,
            name,
            [np.arange(1 + i % 3, dtype=dtype) + k for i in range(4)],
            np.array([0, 1, 0, 1]),
            dtype,
            2,
        )
        for k, name in enumerate(TASK_SPLITS)
    }
    with staged.open("tokenizer.json") as f:
        f.write(b"{}")
    manifest = TaskManifest(
        format_version=TASK_FORMAT_VERSION,
        fingerprint="x",
        kind=TASK_KIND,
        source="test",
        sources=(),
        dtype="uint16",
        vocab_size=10,
        eot_id=None,
        tokenizer=TokenizerInfo(
            "file",
            "tokenizer.json",
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        ),
        labels=("a", "b"),
        split_rule="test",
        seed=0,
        val_fraction=0.1,
        test_fraction=0.1,
        passage_tokens=None,
        splits=splits,
    )
    with staged.open("manifest.json") as f:
        f.write(manifest.to_json().encode())
    staged.commit(last="manifest.json")
    return manifest


def test_reader_round_trip(tmp_path):
    manifest = write_tiny_task(tmp_path / "task")
    task = load_task(str(tmp_path / "task"))
    assert (
        task.manifest == manifest
        and task.labels == ("a", "b")
        and is_task_dir(str(tmp_path / "task"))
    )
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
    with pytest.raises(
        UserError,
        match="is a language-modelling corpus, not a labelled task; run `clusterlm prepare --task",
    ):
        load_task(str(corpus))
    with pytest.raises(UserError, match="no labelled task at"):
        load_task(str(tmp_path / "nothing"))


# --- building: the embedded plays


@pytest.fixture(scope="module")
def play_task(tmp_path_factory):
    """The default play-classification task, built once for this module: (directory, Task)."""
    out = tmp_path_factory.mktemp("plays") / "task"
    prepare_task(TaskOptions(PLAY_TASK, str(out)))
    return out, load_task(str(out))


def test_scenes_are_cut_at_their_headings():
    text = (
        "THE TEMPEST\nPersons of the play\n\n"
        "ACT I.\nSCENE I. A ship at sea.\nMaster. Boatswain!\n\n"
        "  Boatswain. Here.\nACT 2\nScene 2.--An island\n"
        "Prospero. Miranda.\nSCENE: Naples\nSCENE III.\n"
    )
    assert scenes(text) == [
        ("Master. Boatswain!\n", "  Boatswain. Here.\n"),
        ("Prospero. Miranda.\n", "SCENE: Naples\n"),
    ]


def test_passages_pack_whole_lines_and_cut_long_ones():
    lines = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13], [14]]
    got = [p.tolist() for p in passages(lines, 4, np.dtype("uint16"))]
    assert got == [[1, 2], [3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]]


def test_play_task_labels_and_splits(play_task):
    out, task = play_task
    assert len(task.labels) == 37 and "hamlet" in task.labels and "sonnets" not in task.labels
    assert task.manifest.split_rule == "seeded-group" and task.manifest.passage_tokens == 64
    for name, split in task.splits.items():
        assert set(split.labels.tolist()) == set(range(len(task.labels))), (
            name
        )  # every play in every split
        assert np.diff(split.offsets).max() <= 64 and np.diff(split.offsets).min() >= 1
    sizes = {name: len(split) for name, split in task.splits.items()}
    assert sizes["train"] > 6 * sizes["val"] > 0 and sizes["test"] > 0


def test_no_scene_is_split_across_splits(play_task):
    """For a few plays (re-encoding all would be slow): each split holds exactly the passages of
    its scenes, whole and in order, and val and test get round(0.1 * scenes) (at least 1) each."""
    out, task = play_task
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    sources = embedded_corpus()
    found = sorted(plays(sources, list(read_documents(sources))), key=lambda p: p.name)
    assert [p.name for p in found] == list(task.labels)
    for label in (task.labels.index("hamlet"), task.labels.index("tempest"), len(found) - 1):
        play, n = found[label], len(found[label].scenes)
        scene_splits = group_splits(n, label, 0, 0.1, 0.1)
        assert scene_splits.count("val") == scene_splits.count("test") == max(1, round(0.1 * n))
        by_scene = scene_passages(play, tokenizer, 64, np.dtype(task.manifest.dtype))
        for name, split in task.splits.items():
            mine = [split.example(i).tolist() for i in np.flatnonzero(split.labels == label)]
            whole_scenes = [
                p.tolist()
                for j, scene in enumerate(by_scene)
                if scene_splits[j] == name
                for p in scene
            ]
            assert mine == whole_scenes, (play.name, name)


def test_play_task_is_deterministic_and_seeded(tmp_path, tree, monkeypatch):
    """Byte-identical output for the same options (on four plays and the sonnets, to be quick), and
    a different scene split for another seed."""
    files = [
        s
        for s in embedded_corpus()
        if s.name.rsplit("/", 1)[-1].startswith(("ham", "mac", "oth", "lea", "son"))
    ]
    monkeypatch.setattr(task_prepare, "embedded_corpus", lambda: files)
    trees = []
    for seed, name in ((0, "first"), (0, "again"), (1, "other")):
        prepare_task(TaskOptions(PLAY_TASK, str(tmp_path / name), seed=seed))
        trees.append(tree(tmp_path / name))
    assert trees[0] == trees[1]
    assert load_task(str(tmp_path / "first")).labels == ("hamlet", "lear", "macbeth", "othello")
    assert trees[0]["val_tokens.bin"] != trees[2]["val_tokens.bin"]
    first, other = (group_splits(20, 3, seed, 0.1, 0.1) for seed in (0, 1))
    assert first != other and sorted(first) == sorted(other)


def test_default_char_tokenizer_is_the_corpus_tokenizer(play_task, tmp_path):
    out, task = play_task
    corpus = prepare(PrepareOptions(inputs=(), out=str(tmp_path / "corpus"), workers=1))
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert sha == corpus.tokenizer.sha256 == task.manifest.tokenizer.sha256
    assert sha == hashlib.sha256((tmp_path / "corpus" / "tokenizer.json").read_bytes()).hexdigest()


# --- building: a user's JSONL


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return f"jsonl:{path}"


def test_jsonl_with_split_fields(tmp_path):
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    rows = [
        {"text": f"text {i} {'xyz'[i % 3]}", "label": i % 3, "split": split}
        for i, split in enumerate(splits)
    ]
    manifest = prepare_task(
        TaskOptions(write_jsonl(tmp_path / "a.jsonl", rows), str(tmp_path / "out"))
    )
    task = load_task(str(tmp_path / "out"))
    assert task.labels == (0, 1, 2) and manifest.split_rule == "given"
    assert [len(task.splits[s]) for s in TASK_SPLITS] == [6, 3, 3]
    tokenizer = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert tokenizer.decode(task.splits["val"].example(1).tolist()) == "text 7 y"
    assert task.splits["val"].labels.tolist() == [0, 1, 2]


def test_jsonl_without_split_fields_is_split_by_label_from_the_seed(tmp_path, tree):
    rows = [{"text": f"line {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    task_spec = write_jsonl(tmp_path / "b.jsonl", rows)
    built = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{seed}-{len(built)}"
        prepare_task(TaskOptions(task_spec, str(out), seed=seed))
        built[out.name] = tree(out)
    task = load_task(str(tmp_path / "seed0-0"))
    assert task.labels == ("neg", "pos") and task.manifest.split_rule == "seeded-group"
    assert [len(task.splits[s]) for s in TASK_SPLITS] == [32, 4, 4]
    assert built["seed0-0"] == built["seed0-1"]
    assert built["seed0-0"]["val_tokens.bin"] != built["seed1-2"]["val_tokens.bin"]


def test_jsonl_task_through_fsspec_urls(memory_fs):
    rows = [{"text": f"line {i}", "label": "ab"[i % 2]} for i in range(10)]
    memory_fs.pipe_file("/in/t.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    prepare_task(TaskOptions("jsonl:memory://in/t.jsonl", "memory://out/task"))
    task = load_task("memory://out/task")
    assert is_task_dir("memory://out/task") and task.labels == ("a", "b")
    assert task.manifest.sources[0].name.endswith("in/t.jsonl")
