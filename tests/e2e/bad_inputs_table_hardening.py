"""The bad-input corpus, part three: what a shared cluster throws at a job. Crafted checkpoints
whose every checksum matches (the attacker wrote ``complete.json`` too), names that try to leave
their directory, impossible numbers, over-long lines and a live run's out_dir. ``CASES`` in
``bad_inputs_table.py`` includes these."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from bad_inputs_harness import TINY, Shared, case, copy_of, edit_json, write

TRAIN = ("train", "--data.dir", "{data}", "--training.out_dir", "{tmp}/out", *TINY)
DEEP = "[" * 100_000


def resealed(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """``change`` to a checkpoint, then its ``complete.json`` rewritten to match every file."""

    def apply(root: Path) -> None:
        change(root)
        complete = json.loads((root / "complete.json").read_text())
        for name in complete["sha256"]:
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            complete["sha256"][name] = digest
        (root / "complete.json").write_text(json.dumps(complete))

    return apply


def _first_entry(index: dict) -> dict:
    return index["tensors"][sorted(index["tensors"])[0]]


def _as_bytes(index: dict) -> None:  # DCP would unpickle a bytes entry
    _first_entry(index)["kind"] = "bytes"


def _escaping_file(index: dict) -> None:
    _first_entry(index)["chunks"][0]["file"] = "../../outside.distcp"


def _unknown_dtype(index: dict) -> None:
    _first_entry(index)["dtype"] = "torch.float32"


def _wrong_shape(index: dict) -> None:
    _first_entry(index)["size"][0] += 1


def _nested_trainer_state(root: Path) -> None:
    (root / "trainer.json").write_text(DEEP)


def _escaping_shard(manifest: dict) -> None:
    manifest["splits"]["train"]["shards"][0]["file"] = "../../x.bin"


def _short_sha256(manifest: dict) -> None:
    manifest["splits"]["train"]["shards"][0]["sha256"] = "abc"


def _live_lock(tmp: Path, shared: Shared) -> None:
    """``{tmp}/out`` held by a live run: this test's own process."""
    out = tmp / "out"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": os.uname().nodename, "started": "2026-01-01T00:00:00"}
    (out / "run.lock").write_text(json.dumps({**holder, "token": "0" * 32}))


CRAFTED = [  # (name, change to a copy of the checkpoint, part of the line)
    ("bytes-entry", edit_json("tensors.json", _as_bytes), "tensor"),
    ("file-outside", edit_json("tensors.json", _escaping_file), "outside.distcp"),
    ("unknown-dtype", edit_json("tensors.json", _unknown_dtype), "dtype"),
    ("wrong-shape", edit_json("tensors.json", _wrong_shape), ""),
    ("nested-trainer-json", _nested_trainer_state, "trainer.json"),
]

HARDENING = [
    *[
        case(
            f"crafted-ckpt-eval-{name}",
            "eval",
            "--checkpoint",
            "{tmp}/ckpt",
            setup=copy_of("ckpt", "ckpt", resealed(change)),
            expect=expect,
        )
        for name, change, expect in CRAFTED
    ],
    *[
        case(
            f"crafted-ckpt-resume-{name}",
            *TRAIN,
            "--resume",
            "{tmp}/ckpt",
            setup=copy_of("ckpt", "ckpt", resealed(change)),
            expect=expect,
        )
        for name, change, expect in CRAFTED[:3]
    ],
    case("number-lr-nan", *TRAIN, "--optim.lr", "nan", expect="optim.lr"),
    case("number-lr-inf", *TRAIN, "--optim.lr", "inf", expect="optim.lr"),
    case("number-eps-negative", *TRAIN, "--optim.eps", "-1", expect="optim.eps"),
    case(
        "number-hang-timeout-nan",
        *TRAIN,
        "--parallel.hang_timeout_s",
        "nan",
        expect="parallel.hang_timeout_s",
    ),
    case(
        "manifest-shard-outside",
        *TRAIN[:2],
        "{tmp}/data",
        *TRAIN[3:],
        setup=copy_of("data", "data", edit_json("manifest.json", _escaping_shard)),
        expect="not a plain name",
    ),
    case(
        "manifest-shard-sha256-not-hex",
        *TRAIN[:2],
        "{tmp}/data",
        *TRAIN[3:],
        "--data.verify",
        "false",
        setup=copy_of("data", "data", edit_json("manifest.json", _short_sha256)),
        expect="sha256",
    ),
    case(
        "corpus-line-over-limit",
        "prepare",
        "{tmp}/long.txt",
        "--out",
        "{tmp}/prepared",
        "--max-line-bytes",
        "1024",
        setup=write("long.txt", "x" * 4096 + "\n"),
        expect="--max-line-bytes",
    ),
    case(
        "task-line-over-limit",
        "prepare",
        "--task",
        "jsonl:{tmp}/task.jsonl",
        "--out",
        "{tmp}/prepared",
        "--max-line-bytes",
        "1024",
        setup=write("task.jsonl", json.dumps({"text": "y" * 4096, "label": "a"}) + "\n"),
        expect="--max-line-bytes",
    ),
    case("out-dir-held-by-a-live-run", *TRAIN, setup=_live_lock, expect="in use by another run"),
]
