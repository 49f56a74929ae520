"""`clusterlm bench train|init|comm`: time training steps of a config, the start of a job until its
model is ready, or all-reduce algorithms.

``bench train`` takes a training job's command line (``--config``, dotted overrides, ``--nproc``)
plus its own options; ``--against KEY=VALUE,...`` adds a baseline variant of the same config.
What it measures and prints is ``clusterlm.bench.train``'s; ``bench comm`` is
``clusterlm.cli.bench_comm``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from clusterlm.bench.init_speed import bench_init
from clusterlm.bench.train import bench_train, start_from
from clusterlm.cli import (
    SUBCOMMANDS,
    bench_checkpoint,
    bench_comm,
    bench_compare,
    bench_convergence,
    bench_prepare,
    bench_speedrun,
)
from clusterlm.cli.options import parse_job
from clusterlm.config import Config, apply_overrides, validate
from clusterlm.distributed.runtime import leave_process_group
from clusterlm.errors import UserError
from clusterlm.launch import launch


def add_bench_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (compilation, caches)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument(
        "--against", default=None, help="baseline variant: KEY=VALUE[,KEY=VALUE...]"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="after timing, profile one more round of each variant and split its step by kind of "
        "work (on a GPU: kernels by kind, and the gaps in which the device sat idle)",
    )


def baseline_config(cfg: Config, spec: str) -> Config:
    """``cfg`` with the ``--against`` overrides ``KEY=VALUE[,KEY=VALUE...]`` applied."""
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise UserError(f"--against takes KEY=VALUE[,KEY=VALUE...], got {item!r}")
        overrides[key.strip()] = value.strip()
    baseline = apply_overrides(cfg, overrides)
    validate(baseline)
    return baseline


def train_main(argv: list[str]) -> int:
    job = parse_job(
        argv, "clusterlm bench train", "Time training steps of a config.", add_bench_train_options
    )
    if job is None:
        return 0
    args = job.args
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        raise UserError("--steps and --rounds must be >= 1 and --warmup >= 0")
    # A run directory or auto becomes its newest checkpoint here, before any worker starts.
    resume = start_from(job.cfg)
    cfg = apply_overrides(job.cfg, {"checkpoint.resume": resume})
    against = baseline_config(cfg, args.against) if args.against else None
    if job.launch.launches:
        return launch(cfg, job.launch, ["bench", "train", *argv, "--resume", resume])
    lines = bench_train(cfg, args.steps, args.warmup, args.rounds, against, args.breakdown)
    leave_process_group()
    for line in lines:
        print(line)
    return 0


def init_main(argv: list[str]) -> int:
    job = parse_job(
        argv,
        "clusterlm bench init",
        "Time and host memory until the model is ready for its first step, per rank.",
    )
    if job is None:
        return 0
    if job.launch.launches:
        return launch(job.cfg, job.launch, ["bench", "init", *argv])
    lines = bench_init(job.cfg)
    leave_process_group()
    for line in lines:
        print(line)
    return 0


MAINS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main,
    "init": init_main,
    "comm": bench_comm.main,
    "convergence": bench_convergence.main,
    "checkpoint": bench_checkpoint.main,
    "speedrun": bench_speedrun.main,
    "compare-deepspeed": bench_compare.main,
    "prepare": bench_prepare.main,
}


def usage() -> str:
    lines = [
        "usage: clusterlm bench <subcommand> [options]   (clusterlm bench <subcommand> --help)",
        "",
    ]
    return "\n".join(
        lines + [f"  {name:<18} {text}" for name, text in SUBCOMMANDS["bench"].items()]
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] in MAINS:
        return MAINS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        raise UserError(
            f"clusterlm bench needs a subcommand: {', '.join(MAINS)}; "
            "`clusterlm bench --help` says what each measures"
        )
    raise UserError(f"unknown bench subcommand {argv[0]!r}; choose one of: {', '.join(MAINS)}")
