"""The tiny in-process training setup that several end-to-end test files share."""

import json
from pathlib import Path

from clusterlm.cli import main as cli

TINY = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 32,
    "training.micro_batch_size": 4,
    "training.eval_batches": 2,
    "training.log_interval": 1,
    "optim.warmup_steps": 5,
    "metrics.progress": "none",
    "metrics.tensorboard": False,
    "training.precision": "fp32",
}

TINY_ARGS = [f"--{key}={value}" for key, value in TINY.items()] + ["--metrics.plot=false"]


def train_cli(data_dir: Path, out: Path, steps: int, *extra: str) -> int:
    """`clusterlm train` in this process on the tiny model, saving every 2 steps: its status."""
    settings = ["--training.steps", str(steps), "--checkpoint.interval", "2", *TINY_ARGS]
    return cli(
        ["train", "--data.dir", str(data_dir), "--training.out_dir", str(out), *settings, *extra]
    )


def records(out_dir: Path, kind: str) -> list[dict]:
    """The records of one ``kind`` from a run's ``metrics.jsonl``, in order."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
