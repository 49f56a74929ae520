"""Running ``python -m clusterlm`` as a real process, with a tiny model, for the launcher tests."""

import os
import subprocess
import sys

TINY = [
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "16",
    "--training.micro_batch_size",
    "2",
    "--training.eval_batches",
    "2",
    "--training.eval_interval",
    "0",
    "--metrics.progress",
    "lines",
    "--metrics.tensorboard",
    "false",
    "--metrics.peak_flops",
    "1e12",
    "--training.precision",
    "fp32",
]  # the equivalence checks are fp32 (auto picks bf16 on some CPUs)


def clusterlm(
    *args: str, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clusterlm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
