"""nano-cpu training throughput reading its data from a private MooseFS cluster against local disk.

Run as root from the repository root (it starts the cluster the tests use, tests/e2e/
private_moosefs.py): ``python benchmarks/store_throughput.py [STEPS] [REPEATS]``. Runs alternate
local, MooseFS, local, ... so load from elsewhere falls on both alike. Prints per run the median
tokens/s after the first log interval and the time each step waited for data.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from private_moosefs import MooseFS  # noqa: E402


def clusterlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "clusterlm", *args], check=True)


def run(data: Path, out: Path, steps: int) -> tuple[float, float]:
    """Median tokens/s and mean data wait per step (ms) of one nano-cpu run."""
    clusterlm(
        "train", "--config", "configs/nano-cpu.toml", "--data.dir", str(data),
        "--training.out_dir", str(out), "--training.steps", str(steps),
        "--training.eval_interval", "0", "--checkpoint.interval", str(steps),
        "--metrics.progress", "none", "--metrics.plot", "false", "--metrics.tensorboard", "false",
    )  # fmt: skip
    lines = (out / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["kind"] == "train"][1:]
    interval = train[1]["step"] - train[0]["step"]
    wait_ms = 1000 * statistics.mean(r["data_wait_s"][0] for r in train) / interval
    return statistics.median(r["tokens_per_s"] for r in train), wait_ms


def main(steps: int, repeats: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="store-bench-"))
    cluster = MooseFS(root / "moosefs")
    try:
        cluster.start()
        local, remote = root / "local", cluster.mount / "shakespeare-char"
        clusterlm("prepare", "--out", str(local))
        clusterlm("prepare", "--out", str(remote))
        rows = []
        for repeat in range(repeats):
            for name, data in (("local disk", local), ("MooseFS", remote)):
                rate, wait = run(data, root / f"run-{name[0]}{repeat}", steps)
                rows.append((name, rate, wait))
                print(
                    f"{name:10s} run {repeat}: {rate:9.0f} tokens/s, data wait {wait:.3f} ms/step"
                )
        medians = {
            name: statistics.median(r for n, r, _ in rows if n == name)
            for name in ("local disk", "MooseFS")
        }
        print(f"MooseFS / local disk: {medians['MooseFS'] / medians['local disk']:.3f}x")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
