"""`clusterlm chaos`: kill random ranks of a training job with SIGKILL and check it recovers to
the same weights as an uninterrupted run (``clusterlm.launch.chaos``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clusterlm.cli.options import parse_job
from clusterlm.errors import UserError
from clusterlm.launch.chaos import run_chaos
from clusterlm.launch.preflight import preflight


def add_chaos_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs to deliver, one per group")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random victims and moments"
    )
    parser.add_argument(
        "--max-delay",
        type=float,
        default=3.0,
        help="seconds: a kill lands at a random moment up to this long after the group trains",
    )
    parser.add_argument(
        "--no-write-kills",
        action="store_true",
        help="do not aim every second kill at a checkpoint write",
    )


def _without(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` less ``options`` (name -> how many values follow it) in either spelling."""
    kept, skip = [], 0
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip -= 1
        elif name in options:
            skip = 0 if "=" in arg else options[name]
        else:
            kept.append(arg)
    return kept


def main(argv: list[str]) -> int:
    job = parse_job(
        argv,
        "clusterlm chaos",
        "Kill random ranks of a job; compare with an uninterrupted run.",
        add_chaos_options,
    )
    if job is None:
        return 0
    args = job.args
    if job.launch.nproc < 1 or args.kills < 1:
        raise UserError("chaos needs --nproc N (N >= 1) and --kills K (K >= 1)")
    if job.cfg.parallel.hang_timeout_s <= 0:
        raise UserError(
            "chaos follows the ranks through their heartbeats; "
            "leave parallel.hang_timeout_s above 0"
        )
    # the reference run would fail on the same input
    preflight(job.cfg, job.launch.nproc, job.launch.nnodes)
    train_argv = _without(
        argv,
        {
            "--nproc": 1,
            "--max-restarts": 1,
            "--kills": 1,
            "--seed": 1,
            "--max-delay": 1,
            "--no-write-kills": 0,
            "--training.out_dir": 1,
        },
    )
    report = run_chaos(
        job.launch.nproc,
        args.kills,
        train_argv,
        Path(job.cfg.training.out_dir),
        args.seed,
        args.max_delay,
        not args.no_write_kills,
    )
    for note in report.notes:
        print(f"note: {note}")
    print(f"kills during checkpoint writes: {report.during_writes}")
    print(report.summary())
    return 0 if report.recovered == args.kills and report.identical else 1
