"""Training from a remote store (fsspec's memory filesystem) through the bounded shard cache: the
same final weights as from local disk, and the store's figures in the metrics."""

import threading
import time

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from test_train import config, final_weights
from train_helpers import records

from clusterlm.cli import main as cli
from clusterlm.errors import UserError
from clusterlm.train.trainer import train


class OutageFileSystem(MemoryFileSystem):
    """The memory filesystem, as a store that stops answering while ``down`` is set."""

    protocol = "outage"
    down = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("outage://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode and OutageFileSystem.down.is_set():
            raise ConnectionRefusedError("the store does not answer")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("outage", OutageFileSystem, clobber=True)


def test_training_from_a_store_matches_local_disk(data_dir, tmp_path, memory_fs):
    source = data_dir.parent / "text.txt"
    assert cli(["prepare", str(source), "--out", "memory://store", "--workers", "1"]) == 0
    common = dict(training__steps=6, data__cache_gb=0.001, data__retry_s=5.0)
    train(config(data_dir, tmp_path / "local", **common))
    remote = config(
        "memory://store", tmp_path / "remote", data__cache_dir=str(tmp_path / "cache"), **common
    )
    train(remote)
    local, streamed = final_weights(tmp_path / "local"), final_weights(tmp_path / "remote")
    assert all(torch.equal(local[k], streamed[k]) for k in local)
    last = records(tmp_path / "remote", "train")[-1]
    assert last["store_bytes_read"][0] > 0 and last["cache_misses"][0] >= 1
    assert last["cache_hits"][0] >= 1 and last["data_wait_s"][0] >= 0
    local_record = records(tmp_path / "local", "train")[-1]
    assert "store_bytes_read" not in local_record and local_record["data_wait_s"][0] >= 0


def test_a_store_that_stays_down_ends_the_run_and_the_checkpoint_resumes(
    data_dir, tmp_path, memory_fs
):
    """Small shards and a cache of three of them, so every step reads from the store; the store
    goes down after step 3: one line after data.retry_s, and resuming from the last checkpoint
    once it is back ends with the weights of an uninterrupted run from local disk."""
    source = data_dir.parent / "text.txt"
    prepared = ["prepare", str(source), "--out", "memory://outage", "--shard-tokens", "4000"]
    assert cli([*prepared, "--workers", "1"]) == 0
    store = dict(
        data__cache_dir=str(tmp_path / "cache"), data__cache_gb=3 * 8000 / 2**30, data__retry_s=0.5
    )
    common = dict(training__steps=8, checkpoint__interval=2, checkpoint__async_save=False)
    train(config(data_dir, tmp_path / "local", **common))

    def outage_after_step_three() -> None:
        metrics = tmp_path / "remote" / "metrics.jsonl"
        while not (
            metrics.exists()
            and [r for r in records(tmp_path / "remote", "train") if r["step"] >= 3]
        ):
            time.sleep(0.005)
        OutageFileSystem.down.set()

    watcher = threading.Thread(target=outage_after_step_three, daemon=True)
    watcher.start()
    try:
        with pytest.raises(UserError, match=r"failed for data.retry_s = 0.5 s .*resume") as err:
            train(config("outage://outage", tmp_path / "remote", **common, **store))
        assert "\n" not in str(err.value)
    finally:
        watcher.join(timeout=60)
        OutageFileSystem.down.clear()
    assert records(tmp_path / "remote", "train")[-1]["step"] < 8
    train(
        config("outage://outage", tmp_path / "remote", checkpoint__resume="auto", **common, **store)
    )
    local, streamed = final_weights(tmp_path / "local"), final_weights(tmp_path / "remote")
    assert all(torch.equal(local[k], streamed[k]) for k in local)
