"""`clusterlm average`: the mean of a run's last checkpoints' weights, as a checkpoint."""

from __future__ import annotations

import argparse

from clusterlm.cli.parser import Parser
from clusterlm.train.average_checkpoints import average_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="clusterlm average",
        description="Average the weights of a run's newest checkpoints into a checkpoint of a new "
        "run directory, which eval, translate, generate and export read like any run.",
    )
    p.add_argument(
        "--run", default="runs/default", help="training.out_dir of the run whose checkpoints to use"
    )
    p.add_argument(
        "--last", type=int, default=5, help="how many of its newest checkpoints (default: 5)"
    )
    p.add_argument("--out", required=True, help="the new run directory; must not exist or be empty")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    written = average_checkpoints(args.run, args.last, args.out)
    print(f"averaged the last {args.last} checkpoints of {args.run} into {written}")
    return 0
