"""Training from a remote store (fsspec's memory filesystem) through the bounded shard cache: the
same final weights as from local disk, and the store's figures in the metrics."""

import torch
from test_train import config, final_weights
from train_helpers import records

from clusterlm.cli import main as cli
from clusterlm.train.trainer import train


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
