"""Every name read from a file stays inside its directory: a manifest's shard and tokenizer files,
a task's files, and the cache names made from a manifest's sha256 are plain names, and anything
else is refused with one line naming the file, the bad name and the fix."""

from __future__ import annotations

import json

import pytest

from clusterlm.data.loader import TokenStream
from clusterlm.data.manifest import load_manifest, verify_shards
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.task import load_task
from clusterlm.data.task_prepare import TaskOptions, prepare_task
from clusterlm.errors import UserError
from clusterlm.files import is_plain_name, plain_name

BAD_NAMES = [
    "../outside.bin",
    "/etc/passwd",
    "sub/train_00000.bin",
    "..\\outside.bin",
    "C:\\x.bin",
    "",
    ".",
    "..",
    "train\x00.bin",
]


def one_line(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_plain_names():
    for name in (
        "train_00000.bin",
        "tokenizer.json",
        "model-00001-of-00002.safetensors",
        "a..b",
        ".hidden",
    ):
        assert is_plain_name(name) and plain_name(name, "x.json", "fix it") == name
    for name in [*BAD_NAMES, None, 3, b"bytes"]:
        assert not is_plain_name(name)
        message = one_line(
            lambda name=name: plain_name(name, "index.json in /d", "download it again")
        )
        assert message.startswith(
            f"index.json in /d names the file {name!r}, which is not a plain name"
        )
        assert message.endswith("; download it again")


@pytest.fixture
def prepared(corpus_dir, tmp_path):
    out = tmp_path / "prepared"
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(out), shard_tokens=300, workers=1))
    return out


def edit_manifest(directory, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["shard", "tokenizer"])
def test_a_manifest_naming_a_path_is_refused_by_every_reader(prepared, tmp_path, name, field):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)

    def change(manifest):
        if field == "shard":
            manifest["splits"]["train"]["shards"][0]["file"] = name
        else:
            manifest["tokenizer"]["file"] = name

    edit_manifest(prepared, change)
    for reader in (load_manifest, verify_shards, lambda d: TokenStream(d, "train")):
        message = one_line(lambda reader=reader: reader(prepared))
        assert message.startswith(f"manifest.json in {prepared} is malformed")
        assert repr(name) in message and "not a plain name" in message and "--force" in message


@pytest.mark.parametrize("sha256", ["../../etc/cron.d/x", "ABC", "a" * 63, "g" * 64, "A" * 64])
def test_a_manifest_sha256_that_is_not_one_is_refused(prepared, sha256):
    edit_manifest(prepared, lambda m: m["splits"]["val"]["shards"][0].update(sha256=sha256))
    message = one_line(lambda: load_manifest(prepared))
    assert "is malformed" in message and repr(sha256) in message


def test_prepare_treats_such_a_manifest_as_not_its_own(prepared, corpus_dir):
    edit_manifest(prepared, lambda m: m["splits"]["train"]["shards"][0].update(file="../x"))
    options = PrepareOptions(
        inputs=(str(corpus_dir),), out=str(prepared), shard_tokens=300, workers=1
    )
    assert "--force" in one_line(lambda: prepare(options))
    prepare(PrepareOptions(**{**options.__dict__, "force": True}))
    verify_shards(prepared)


@pytest.mark.parametrize("name", ["../train_tokens.bin", "/etc/passwd", "sub/x.bin", ".."])
def test_a_task_manifest_naming_a_path_is_refused(tmp_path, name):
    rows = [
        {"text": f"example {i}", "label": i % 2, "split": ("train", "val", "test")[i % 3]}
        for i in range(12)
    ]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = tmp_path / "task"
    prepare_task(TaskOptions(task=f"jsonl:{tmp_path / 'task.jsonl'}", out=str(task)))
    edit_manifest(task, lambda m: m["splits"]["val"]["label_file"].update(file=name))
    message = one_line(lambda: load_task(str(task)))
    assert message.startswith(f"manifest.json in {task} is not a valid task manifest")
    assert repr(name) in message and "not a plain name" in message
