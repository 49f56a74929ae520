"""`clusterlm submit`: a training job for a cluster's scheduler (Slurm), or its script (--dry-run).

    clusterlm submit --scheduler slurm --nodes 2 --procs-per-node 4 --time 2:00:00 -- --config X ...

Everything after ``--`` is `clusterlm train`'s options; they are checked here (config, and the
layout for nodes x processes) so that a mistake fails now, not after the job waited in the queue.
"""

from __future__ import annotations

import os
import shlex
import sys

from clusterlm.cli.options import Parser, parse_job
from clusterlm.config.degrees import check_layout
from clusterlm.errors import UserError
from clusterlm.launch.slurm import SlurmJob, batch_script, sbatch_command, submit
from clusterlm.launch.torchrun import LAUNCH_OPTIONS


def build_parser() -> Parser:
    parser = Parser(
        prog="clusterlm submit",
        description="Submit a training job to a scheduler; prints the job id.",
        usage="clusterlm submit --scheduler slurm --nodes N --procs-per-node P [options] "
        "-- <train options>",
        epilog="Everything after -- is `clusterlm train`'s options (see `clusterlm train --help`). "
        "The job trains with --resume auto, so when requeued it continues from its newest "
        "checkpoint.",
    )
    parser.add_argument(
        "--scheduler", choices=["slurm"], required=True, help="the cluster's scheduler"
    )
    parser.add_argument("--nodes", type=int, required=True, help="nodes to run on")
    parser.add_argument(
        "--procs-per-node",
        type=int,
        required=True,
        help="training processes per node (GPUs per node)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=0, help="GPUs to request on each node (default none)"
    )
    parser.add_argument(
        "--time",
        default="",
        help="time limit (Slurm: MINUTES, H:MM:SS, D-H:MM:SS); default the partition's",
    )
    parser.add_argument("--partition", default="", help="partition (queue); default the cluster's")
    parser.add_argument(
        "--grace",
        type=int,
        default=120,
        help="seconds before the time limit at which the job checkpoints and requeues "
        "(default 120)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the batch script instead of submitting it"
    )
    return parser


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    train_argv = argv[split + 1 :]
    _refuse_own_launch_options(train_argv)
    job_args = parse_job(
        train_argv, "clusterlm submit ... --", "Options of `clusterlm train` for the job."
    )
    if job_args is None:
        return 0
    cfg = job_args.cfg
    job = SlurmJob(
        args.nodes,
        args.procs_per_node,
        train_argv,
        os.path.abspath(cfg.training.out_dir),
        cfg.training.steps,
        args.time,
        args.partition,
        args.grace,
        args.gpus_per_node,
    )
    check_layout(cfg, args.nodes * args.procs_per_node)
    if args.dry_run:
        print(batch_script(job), end="")
        print(f"# submit with: {shlex.join(sbatch_command(job))} < this script", file=sys.stderr)
        return 0
    print(submit(job))
    return 0


def _refuse_own_launch_options(train_argv: list[str]) -> None:
    for arg in train_argv:
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            raise UserError(
                f"{name} is torchrun's option; with submit give --nodes and --procs-per-node "
                "before `--`"
            )
        if name in ("--resume", "--checkpoint.resume"):
            raise UserError(
                "submit always trains with --resume auto (a requeued job continues from the "
                f"newest checkpoint in training.out_dir); drop {name}"
            )
