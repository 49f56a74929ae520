"""`clusterlm bench checkpoint`: the training stall per save, synchronous against asynchronous
(``clusterlm.bench.checkpoint_speed``)."""

from __future__ import annotations

import argparse
import os

from clusterlm.bench.checkpoint_speed import bench_checkpoint
from clusterlm.cli.options import parse_job
from clusterlm.distributed.runtime import leave_process_group
from clusterlm.errors import UserError
from clusterlm.launch import launch


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--saves", type=int, default=3, help="timed saves per mode")
    parser.add_argument("--steps", type=int, default=3, help="training steps between saves")


def main(argv: list[str]) -> int:
    job = parse_job(
        argv,
        "clusterlm bench checkpoint",
        "Training stall per checkpoint save, sync vs async.",
        add_options,
    )
    if job is None:
        return 0
    if job.args.saves < 1 or job.args.steps < 0:
        raise UserError("--saves must be >= 1 and --steps >= 0")
    if job.launch.launches:
        return launch(job.cfg, job.launch, ["bench", "checkpoint", *argv])
    lines = bench_checkpoint(job.cfg, job.args.saves, job.args.steps)
    rank0 = os.environ.get("RANK", "0") == "0"
    leave_process_group()
    if rank0:
        print("\n".join(lines))
    return 0
