"""nano-cpu training throughput reading its data from a private store against local disk: a
MooseFS cluster (FUSE mount), or S3 served by a Ceph cluster's radosgw through the shard cache.

Run as root from the repository root (it starts the cluster the tests use, tests/e2e/
private_moosefs.py or private_ceph.py):
``python benchmarks/store_throughput.py [STEPS] [REPEATS] [moosefs|ceph]``. Runs alternate local,
store, local, ... so load from elsewhere falls on both alike; every S3 run starts with an empty
(cold) cache. Prints per run the median tokens/s after the first log interval and the time each
step waited for data.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from private_ceph import Ceph  # noqa: E402
from private_moosefs import MooseFS  # noqa: E402


def clusterlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "clusterlm", *args], check=True)


def run(data: str, out: Path, steps: int) -> tuple[float, float, float]:
    """Median tokens/s, mean data wait per step after the first log interval (ms), and the data
    wait of the first interval, a cold cache's downloads included (ms), of one nano-cpu run."""
    clusterlm(
        "train", "--config", "configs/nano-cpu.toml", "--data.dir", data,
        "--data.cache_dir", str(out / "cache"),
        "--training.out_dir", str(out), "--training.steps", str(steps),
        "--training.eval_interval", "0", "--checkpoint.interval", str(steps),
        "--metrics.progress", "none", "--metrics.plot", "false", "--metrics.tensorboard", "false",
    )  # fmt: skip
    lines = (out / "metrics.jsonl").read_text().splitlines()
    first, *train = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    interval = train[1]["step"] - train[0]["step"]
    wait_ms = 1000 * statistics.mean(r["data_wait_s"][0] for r in train) / interval
    return (
        statistics.median(r["tokens_per_s"] for r in train),
        wait_ms,
        1000 * first["data_wait_s"][0],
    )


def start_store(kind: str, root: Path) -> tuple[MooseFS | Ceph, str]:
    """The store's cluster, started, and where the prepared data goes on it."""
    if kind == "moosefs":
        moosefs = MooseFS(root / "moosefs")
        moosefs.start()
        return moosefs, str(moosefs.mount / "shakespeare-char")
    ceph = Ceph(root / "ceph")
    ceph.start()
    os.environ.update(ceph.credentials)  # how users point S3 clients at a store
    return ceph, f"{ceph.create_bucket('bench')}/shakespeare-char"


def main(steps: int = 300, repeats: int = 3, kind: str = "moosefs") -> None:
    root = Path(tempfile.mkdtemp(prefix="store-bench-"))
    store = {"moosefs": "MooseFS", "ceph": "Ceph S3"}[kind]
    local = str(root / "local")
    cluster, remote = start_store(kind, root)
    try:
        clusterlm("prepare", "--out", local)
        clusterlm("prepare", "--out", remote)
        rows = []
        for repeat in range(repeats):
            for name, data in (("local disk", local), (store, remote)):
                rate, wait, first = run(data, root / f"run-{name[0]}{repeat}", steps)
                rows.append((name, rate))
                print(
                    f"{name:10s} run {repeat}: {rate:9.0f} tokens/s, data wait {wait:.3f} ms/step"
                    f" (first log interval: {first:.1f} ms)"
                )
        medians = {
            name: statistics.median(r for n, r in rows if n == name)
            for name in ("local disk", store)
        }
        print(f"{store} / local disk: {medians[store] / medians['local disk']:.3f}x")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
