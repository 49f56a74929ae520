"""Preparing onto and training from MooseFS, a real distributed file system (``private_moosefs``):
atomic writes, the same weights as from local disk, and nothing changed by a chunkserver's death."""

import subprocess
import sys
import threading
import time

import torch
from test_train import config, final_weights
from train_helpers import records

from clusterlm.cli import main as cli
from clusterlm.data.manifest import verify_shards
from clusterlm.errors import UserError
from clusterlm.train.trainer import train

STEPS = 8


def prepare_onto(moosefs, data_dir, name: str):
    out = moosefs.mount / name
    source = data_dir.parent / "text.txt"
    assert cli(["prepare", str(source), "--out", str(out), "--workers", "1"]) == 0
    return out


def test_prepare_onto_moosefs_publishes_the_manifest_last(moosefs, data_dir, tmp_path):
    """Polled all the while a `clusterlm prepare` process writes: once the manifest is there,
    every file it lists is complete; and every file is stored twice (goal 2)."""
    out = moosefs.mount / "atomic"
    command = [sys.executable, "-m", "clusterlm", "prepare", str(data_dir.parent / "text.txt")]
    options = ["--out", str(out), "--workers", "1", "--shard-tokens", "2000"]
    writer = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL)
    seen_incomplete, checks = False, 0
    while writer.poll() is None:
        if (out / "manifest.json").exists():
            verify_shards(out)  # raises if a listed file were missing or partial
            checks += 1
        else:
            seen_incomplete = seen_incomplete or out.exists()
        time.sleep(0.01)
    assert writer.wait(timeout=120) == 0
    assert seen_incomplete  # the dataset was seen half-written, and never as complete then
    manifest = verify_shards(out)
    assert len(manifest.splits["train"].shards) > 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    shard = out / manifest.splits["train"].shards[0].file
    assert moosefs.tool("mfsfileinfo", str(shard)).count("(status:VALID)") == 2


def test_training_from_moosefs_matches_local_disk(moosefs, data_dir, tmp_path):
    remote = prepare_onto(moosefs, data_dir, "train-same")
    train(config(data_dir, tmp_path / "local", training__steps=STEPS))
    train(config(remote, tmp_path / "moosefs", training__steps=STEPS))
    local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "moosefs")
    assert all(torch.equal(local[k], stored[k]) for k in local)


def test_a_chunkserver_killed_mid_training_changes_nothing(moosefs, data_dir, tmp_path):
    remote = prepare_onto(moosefs, data_dir, "train-kill")
    killed = threading.Event()

    def kill_at_step_two() -> None:
        metrics = tmp_path / "moosefs" / "metrics.jsonl"
        while not (metrics.exists() and records(tmp_path / "moosefs", "train")):
            time.sleep(0.01)
        moosefs.kill_chunkserver(0)
        moosefs.drop_cached_pages(remote)  # later reads go to the surviving copies
        killed.set()

    train(config(data_dir, tmp_path / "local", training__steps=STEPS))
    killer = threading.Thread(target=kill_at_step_two, daemon=True)
    killer.start()
    try:
        train(config(remote, tmp_path / "moosefs", training__steps=STEPS))
        killer.join(timeout=60)
        assert killed.is_set()
        local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "moosefs")
        assert all(torch.equal(local[k], stored[k]) for k in local)
        assert records(tmp_path / "moosefs", "train")[-1]["step"] == STEPS
    finally:
        killer.join(timeout=60)
        if killed.is_set():
            moosefs.restart_chunkserver(0)


def test_training_from_a_missing_moosefs_directory_is_one_line(moosefs, tmp_path):
    try:
        train(config(moosefs.mount / "nothing", tmp_path / "run", training__steps=1))
    except UserError as err:
        assert "no prepared data at" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("training from a directory with no data ran")
