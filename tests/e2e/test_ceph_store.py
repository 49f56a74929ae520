"""Preparing onto and training from S3 served by a real Ceph cluster (``private_ceph``): the
manifest published last, the same weights as from local disk, and nothing changed by an OSD's
death."""

import os
import subprocess
import sys
import threading
import time

import fsspec
import pytest
import torch
from test_train import config, final_weights
from train_helpers import TINY_ARGS, records, train_cli

from clusterlm.cli import main as cli
from clusterlm.data.manifest import load_manifest, verify_shards
from clusterlm.errors import UserError
from clusterlm.train.trainer import train

s3fs = pytest.importorskip("s3fs", reason="needs the optional extra .[s3] (make test installs it)")

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


def test_two_processes_train_from_s3_as_from_local_disk(s3, data_dir, tmp_path):
    """`train --nproc 2`: each rank streams the shards of its own windows through the node's
    cache, and the weights are those of the same two-process run from local disk."""
    prepare_onto(f"{s3}/data", data_dir, "--shard-tokens", "4000")
    cache = ["--data.cache_dir", str(tmp_path / "cache"), "--data.cache_gb", str(3 * 8000 / 2**30)]
    assert train_cli(data_dir, tmp_path / "local", STEPS, "--nproc", "2") == 0
    assert train_cli(f"{s3}/data", tmp_path / "s3", STEPS, "--nproc", "2", *cache) == 0
    local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "s3")
    assert all(torch.equal(local[k], stored[k]) for k in local)
    last = records(tmp_path / "s3", "train")[-1]
    assert len(last["store_bytes_read"]) == 2 and min(last["store_bytes_read"]) > 0


def wait_for_step(run, step: int) -> None:
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and [r for r in records(run, "train") if r["step"] >= step]):
        time.sleep(0.01)


def test_an_osd_killed_mid_training_changes_nothing(ceph, s3, data_dir, tmp_path):
    """An OSD dies after step 2; the shards read after it come from the other copies, and the
    weights are those of the run from local disk, bit for bit."""
    prepare_onto(f"{s3}/data", data_dir, "--shard-tokens", "4000")
    killed = threading.Event()

    def kill_at_step_two() -> None:
        wait_for_step(tmp_path / "s3", 2)
        ceph.kill_osd(0)
        killed.set()

    train(config(data_dir, tmp_path / "local", training__steps=STEPS))
    killer = threading.Thread(target=kill_at_step_two, daemon=True)
    killer.start()
    try:
        train(store_config(f"{s3}/data", tmp_path / "s3", tmp_path, training__steps=STEPS))
        killer.join(timeout=60)
        assert killed.is_set()
        local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "s3")
        assert all(torch.equal(local[k], stored[k]) for k in local)
        last = records(tmp_path / "s3", "train")[-1]
        assert last["step"] == STEPS and last["cache_misses"][0] > 3  # read after the kill
    finally:
        killer.join(timeout=60)
        if killed.is_set():
            ceph.replace_osd(0)


def test_a_gateway_down_for_longer_than_retry_s_ends_the_run_and_it_resumes(
    ceph, s3, data_dir, tmp_path
):
    """radosgw dies after step 3: one line after data.retry_s; once it is back, the run resumes
    from its last checkpoint and ends with the weights of an uninterrupted run from local disk."""
    prepare_onto(f"{s3}/data", data_dir, "--shard-tokens", "4000")
    common = dict(training__steps=8, checkpoint__interval=2, checkpoint__async_save=False)
    train(config(data_dir, tmp_path / "local", **common))
    store = dict(data__retry_s=1, **common)

    def kill_gateway_at_step_three() -> None:
        wait_for_step(tmp_path / "s3", 3)
        ceph.kill_gateway()

    watcher = threading.Thread(target=kill_gateway_at_step_three, daemon=True)
    watcher.start()
    try:
        with pytest.raises(UserError, match=r"failed for data.retry_s = 1 s .*resume") as err:
            train(store_config(f"{s3}/data", tmp_path / "s3", tmp_path, **store))
        assert "\n" not in str(err.value)
    finally:
        watcher.join(timeout=60)
        ceph.start_gateway()
    assert records(tmp_path / "s3", "train")[-1]["step"] < 8
    train(store_config(f"{s3}/data", tmp_path / "s3", tmp_path, checkpoint__resume="auto", **store))
    local, stored = final_weights(tmp_path / "local"), final_weights(tmp_path / "s3")
    assert all(torch.equal(local[k], stored[k]) for k in local)


def prepare_process(out: str, data_dir, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "clusterlm", "prepare", str(data_dir.parent / "text.txt")]
    options = ["--out", out, "--workers", "1", "--shard-tokens", "4000"]
    return subprocess.Popen(
        [*command, *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def wait_for_objects(out: str) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    while not (fs.exists(out) and fs.ls(out, refresh=True)):
        time.sleep(0.02)


def test_a_prepare_killed_or_cut_off_from_the_store_leaves_no_manifest(ceph, s3, data_dir):
    """A `clusterlm prepare` killed mid-upload, and one whose gateway dies mid-upload (one line
    naming the store, non-zero exit): neither leaves a manifest, so training refuses the
    half-written data; a new prepare completes it."""
    out = f"{s3}/cut"
    writer = prepare_process(out, data_dir)
    wait_for_objects(out)
    writer.kill()
    writer.wait(timeout=60)
    with pytest.raises(UserError, match="no prepared data at"):
        load_manifest(out)

    writer = prepare_process(out, data_dir, AWS_MAX_ATTEMPTS="1")
    time.sleep(1.0)  # into its uploads
    ceph.kill_gateway()
    try:
        _, err = writer.communicate(timeout=120)
    finally:
        ceph.start_gateway()
    assert writer.returncode != 0 and "does not answer" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="no prepared data at"):
        load_manifest(out)
    prepare_onto(out, data_dir, "--shard-tokens", "4000")
    assert len(verify_shards(out).splits["train"].shards) > 1


def run_clusterlm(argv: list[str], env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    """(status, stderr) of the command: in this process, or as launched processes for --nproc."""
    if "--nproc" in argv:
        command = [sys.executable, "-m", "clusterlm", *argv]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
        )
        return done.returncode, done.stderr
    with monkeypatch.context() as patched:
        for name, value in env.items():
            patched.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a client reads the variables when made
        capsys.readouterr()
        status = cli(argv)
    s3fs.S3FileSystem.clear_instance_cache()
    return status, capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "train", "train-nproc2"])
def test_wrong_credentials_and_missing_buckets_are_one_line(
    command, s3, data_dir, tmp_path, monkeypatch, capsys
):
    """Against the live store: a wrong secret key, and a bucket that does not exist; one line
    naming the problem and the fix, a non-zero exit, nothing written."""
    problems = {
        "refused access (Forbidden); set AWS_ACCESS_KEY_ID": ({"AWS_SECRET_ACCESS_KEY": "x"}, s3),
        "does not exist on the store; create it": ({}, "s3://no-such-bucket"),
    }
    for expect, (env, bucket) in problems.items():
        if command == "prepare":
            argv = ["prepare", str(data_dir.parent / "text.txt"), "--out", f"{bucket}/data"]
        else:
            run = tmp_path / f"run-{len(env)}"
            argv = ["train", *TINY_ARGS, "--data.dir", f"{bucket}/data", "--training.out_dir"]
            argv += [str(run), "--data.cache_dir", str(tmp_path / "cache")]
            argv += ["--nproc", "2"] if command == "train-nproc2" else []
        status, err = run_clusterlm(argv, env, monkeypatch, capsys)
        assert status != 0 and expect in err and len(err.strip().splitlines()) == 1, err
        assert not fsspec.filesystem("s3", skip_instance_cache=True).ls(s3, refresh=True)
        assert not list(tmp_path.iterdir())
