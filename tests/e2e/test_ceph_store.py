"""Preparing onto and training from S3 served by a real Ceph cluster (``private_ceph``): the
manifest published last, the same weights as from local disk, and nothing changed by an OSD's
death."""

import subprocess
import sys
import time

import fsspec
import torch
from test_train import config, final_weights
from train_helpers import records

from clusterlm.cli import main as cli
from clusterlm.data.manifest import verify_shards
from clusterlm.train.trainer import train

STEPS = 8


def prepare_onto(url: str, data_dir, *options: str) -> None:
    source = data_dir.parent / "text.txt"
    assert cli(["prepare", str(source), "--out", url, "--workers", "1", *options]) == 0


def store_config(url: str, run, tmp_path, **overrides):
    """Training from ``url`` through a cache of a few small shards, so steps keep reading the
    store."""
    cache = str(tmp_path / f"cache-{run.name}")
    return config(url, run, data__cache_dir=cache, data__cache_gb=3 * 8000 / 2**30, **overrides)


def test_prepare_onto_s3_publishes_the_manifest_last(s3, data_dir):
    """Polled all the while a `clusterlm prepare` process writes: once the manifest is there,
    every file it lists is complete; no temporary object is left."""
    out = f"{s3}/atomic"
    command = [sys.executable, "-m", "clusterlm", "prepare", str(data_dir.parent / "text.txt")]
    options = ["--out", out, "--workers", "1", "--shard-tokens", "20000"]
    writer = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    seen_incomplete, checks = False, 0
    while writer.poll() is None:
        fs.invalidate_cache()
        names = fs.ls(out) if fs.exists(out) else []
        if any(name.endswith("/manifest.json") for name in names):
            verify_shards(out)  # raises if a listed file were missing or partial
            checks += 1
        else:
            seen_incomplete = seen_incomplete or bool(names)
        time.sleep(0.05)
    assert writer.wait(timeout=120) == 0
    assert seen_incomplete  # the dataset was seen half-written, and never as complete then
    fs.invalidate_cache()
    manifest = verify_shards(out)
    assert len(manifest.splits["train"].shards) > 1
    assert not [name for name in fs.ls(out) if ".tmp-" in name]


def test_training_from_s3_matches_local_disk(s3, data_dir, tmp_path):
    prepare_onto(f"{s3}/data", data_dir, "--shard-tokens", "4000")
    train(config(data_dir, tmp_path / "local", training__steps=STEPS))
    train(store_config(f"{s3}/data", tmp_path / "s3", tmp_path, training__steps=STEPS))
    local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "s3")
    assert all(torch.equal(local[k], stored[k]) for k in local)
    last = records(tmp_path / "s3", "train")[-1]
    assert last["store_bytes_read"][0] > 0 and last["cache_misses"][0] >= 1
    assert last["cache_hits"][0] >= 1 and last["data_wait_s"][0] >= 0
