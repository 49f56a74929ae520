"""`prepare`: output layout and manifest, determinism, no-op re-runs, --force, atomicity, fsspec."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from clusterlm.data import prepare as prepare_module
from clusterlm.data.loader import TokenLoader, TokenStream
from clusterlm.data.manifest import load_manifest, token_dtype, verify_shards
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.shard_cache import CacheSettings
from clusterlm.data.shards import ShardWriter
from clusterlm.data.tokenizer import EOT, Tokenizer
from clusterlm.errors import UserError


def options(corpus, out, **overrides) -> PrepareOptions:
    base = PrepareOptions(inputs=(str(corpus),), out=str(out), shard_tokens=300, workers=1)
    return dataclasses.replace(base, **overrides)


def split_text_of(out, manifest, split) -> str:
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    ids = np.concatenate(
        [np.fromfile(out / s.file, dtype=dtype) for s in manifest.splits[split].shards]
    )
    return Tokenizer.load(out / "tokenizer.json").decode(ids.tolist())


def test_output_files_and_manifest(corpus_dir, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(options(corpus_dir, out))
    assert manifest == load_manifest(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *manifest.files])
    assert manifest.dtype == "uint16" and manifest.tokenizer.kind == "char"
    assert (
        manifest.tokenizer.sha256
        == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert [s.name for s in manifest.sources] == [
        str(corpus_dir / n) for n in ("a.txt", "b.txt", "sub/c.txt")
    ]
    assert (
        manifest.sources[0].sha256
        == hashlib.sha256((corpus_dir / "a.txt").read_bytes()).hexdigest()
    )
    assert (manifest.split_rule, manifest.val_fraction, manifest.seed) == ("seeded-span", 0.1, 0)
    for split in manifest.splits.values():
        for shard in split.shards:
            data = (out / shard.file).read_bytes()
            assert len(data) == 2 * shard.tokens <= 2 * 300
            assert hashlib.sha256(data).hexdigest() == shard.sha256
    assert len(manifest.splits["train"].shards) > 1
    verify_shards(out)


def test_every_character_lands_in_exactly_one_split(corpus_dir, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(options(corpus_dir, out, val_fraction=0.25))
    documents = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.rglob("*.txt"))]
    spans = {
        split: split_text_of(out, manifest, split).split(EOT)[:-1] for split in ("train", "val")
    }
    assert len(spans["val"]) == len(documents)  # one held-out span per document
    assert all(any(span in doc for doc in documents) for span in spans["train"] + spans["val"])
    assert sum(map(len, spans["train"] + spans["val"])) == sum(map(len, documents))
    val_chars = sum(map(len, spans["val"]))
    assert val_chars == pytest.approx(0.25 * sum(map(len, documents)), abs=3)


@pytest.mark.parametrize(
    ("vocab_size", "candidates", "expected"),
    [
        (256, ("uint8", "uint16"), "uint8"),
        (257, ("uint8", "uint16"), "uint16"),
        (65536, ("uint16", "uint32"), "uint16"),
        (65537, ("uint16", "uint32"), "uint32"),
    ],
)
def test_token_dtype_is_the_smallest_that_fits(vocab_size, candidates, expected):
    assert token_dtype(vocab_size, candidates) == np.dtype(expected)


def test_token_dtype_refuses_a_vocabulary_that_does_not_fit():
    with pytest.raises(UserError, match="300 tokens does not fit in uint8"):
        token_dtype(300, ("uint8",))


def test_same_inputs_give_identical_bytes_for_any_worker_count(
    corpus_dir, tmp_path, tree, monkeypatch
):
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 64)  # several pieces per document
    outs = [tmp_path / f"out{workers}" for workers in (1, 3)]
    for out, workers in zip(outs, (1, 3), strict=True):
        prepare(options(corpus_dir, out, tokenizer="bpe", vocab_size=300, workers=workers))
    assert tree(outs[0]) == tree(outs[1])
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 1 << 20)
    prepare(options(corpus_dir, tmp_path / "whole", tokenizer="bpe", vocab_size=300))
    assert tree(tmp_path / "whole") == tree(outs[0])  # piecewise tokenizing changes nothing


def test_seed_moves_the_validation_spans(corpus_dir, tmp_path):
    a = prepare(options(corpus_dir, tmp_path / "a", seed=0))
    b = prepare(options(corpus_dir, tmp_path / "b", seed=1))
    assert a.splits["val"].shards[0].sha256 != b.splits["val"].shards[0].sha256
    assert a.fingerprint != b.fingerprint


def test_rerun_is_a_no_op(corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    prepare(options(corpus_dir, out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    prepare(options(corpus_dir, out, workers=2))  # worker count is not part of the dataset
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_rerun_rebuilds_its_own_dataset_when_a_shard_is_missing(corpus_dir, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(options(corpus_dir, out))
    (out / manifest.splits["train"].shards[0].file).unlink()
    prepare(options(corpus_dir, out))
    verify_shards(out)


def test_different_dataset_needs_force_and_force_replaces_it(corpus_dir, tmp_path, tree):
    out = tmp_path / "out"
    prepare(options(corpus_dir, out, shard_tokens=100))
    before = tree(out)
    with pytest.raises(UserError, match="--force"):
        prepare(options(corpus_dir, out, shard_tokens=1000))
    assert tree(out) == before
    manifest = prepare(options(corpus_dir, out, shard_tokens=1000, force=True))
    # Shards of the old dataset beyond the new count are gone.
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *manifest.files])
    verify_shards(out)


def test_non_empty_directory_without_manifest_is_refused(corpus_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        prepare(options(corpus_dir, out))
    prepare(options(corpus_dir, out, force=True))
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces only prepared data


def crash_on_second_shard(monkeypatch):
    real_open_next = ShardWriter._open_next
    opened = []

    def open_next(self):
        opened.append(1)
        if len(opened) == 2:
            raise RuntimeError("simulated crash")
        real_open_next(self)

    monkeypatch.setattr(ShardWriter, "_open_next", open_next)


def test_crash_mid_write_leaves_no_output(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(options(corpus_dir, out))
    assert not out.exists()


def test_crash_mid_write_to_a_remote_leaves_no_files(corpus_dir, monkeypatch, memory_fs):
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(options(corpus_dir, "memory://out"))
    assert memory_fs.find("/") == []


def test_crash_mid_write_keeps_the_previous_dataset(corpus_dir, tmp_path, monkeypatch, tree):
    out = tmp_path / "out"
    prepare(options(corpus_dir, out))
    before = tree(out)
    crash_on_second_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(options(corpus_dir, out, shard_tokens=100, force=True))
    assert tree(out) == before
    verify_shards(out)


def test_memory_filesystem_round_trip(corpus_dir, tmp_path, memory_fs):
    for path in sorted(corpus_dir.rglob("*.txt")):
        memory_fs.pipe(f"/in/{path.relative_to(corpus_dir)}", path.read_bytes())
    remote = prepare(options("memory://in", "memory://out"))
    local = prepare(options(corpus_dir, tmp_path / "local"))
    assert [s.name for s in remote.sources] == [
        "memory:///in/a.txt",
        "memory:///in/b.txt",
        "memory:///in/sub/c.txt",
    ]
    assert remote.splits == local.splits
    assert not [p for p in memory_fs.find("/out") if ".tmp-" in p]
    verify_shards("memory://out")
    cache = tmp_path / "cache"
    stream = TokenStream("memory://out", "train", CacheSettings(cache))
    batches = TokenLoader(stream, block_size=16, micro_batch_size=4).next_step()
    assert stream.cache is not None
    stream.cache.settle()
    expected = TokenLoader(
        TokenStream(tmp_path / "local", "train"), block_size=16, micro_batch_size=4
    ).next_step()
    assert all(a.equal(b) for a, b in zip(batches[0], expected[0], strict=True))
    cached = {p.name for p in cache.iterdir()}
    assert cached and cached <= {f"{s.sha256}.bin" for s in remote.splits["train"].shards}


def test_load_manifest_names_missing_and_malformed_data(corpus_dir, tmp_path):
    with pytest.raises(UserError, match=r"no prepared data at .*; run `clusterlm prepare --out"):
        load_manifest(tmp_path / "nothing")
    out = tmp_path / "out"
    prepare(options(corpus_dir, out))
    manifest_json = json.loads((out / "manifest.json").read_text())
    for broken in (
        {**manifest_json, "vocab_size": "many"},
        {k: v for k, v in manifest_json.items() if k != "dtype"},
    ):
        (out / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="malformed"):
            load_manifest(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="malformed"):
        load_manifest(out)


def test_verify_shards_names_the_corrupt_shard(corpus_dir, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(options(corpus_dir, out))
    shard = out / manifest.splits["train"].shards[1].file
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{shard.name} in .* is corrupt: its sha256 differs"):
        verify_shards(out)
