"""`clusterlm bench convergence`: the command line of ``clusterlm.bench.convergence``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clusterlm.bench.convergence import HEADER, VARIANTS, format_row, study, write_outputs
from clusterlm.cli.options import Parser, parse_dotted_args
from clusterlm.errors import UserError

DESCRIPTION = (
    "`clusterlm bench convergence`: train one model on one token budget synchronously (ddp), "
    "through a parameter server (async, SSP s=1 and s=4), with local SGD (H=4, 16) and DiLoCo, "
    "one worker slowed; write convergence.json and convergence.png. Dotted --section.key VALUE "
    "overrides change the study's small default budget (model, steps, batch) for every run."
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clusterlm bench convergence", description=DESCRIPTION)
    parser.add_argument(
        "--nproc", type=int, default=4, help="worker processes (ps adds one server; default 4)"
    )
    parser.add_argument(
        "--straggler", type=int, help="the worker rank to slow down (default: none)"
    )
    parser.add_argument(
        "--slowdown",
        type=float,
        default=3.0,
        help="the straggler's factor on its step time (default 3)",
    )
    parser.add_argument(
        "--out", required=True, help="directory for convergence.json, convergence.png and the runs"
    )
    parser.add_argument(
        "--config", help="TOML file the runs start from (default: the built-in defaults)"
    )
    parser.add_argument(
        "--runs", help=f"comma list, a subset of: {','.join(v.slug for v in VARIANTS)}"
    )
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds one run may take (default 1200)"
    )
    return parser


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.nproc < 1 or args.slowdown < 1 or args.timeout <= 0:
        raise UserError("--nproc must be >= 1, --slowdown >= 1 and --timeout > 0")
    out = Path(args.out)
    print(HEADER, flush=True)
    report = study(
        args.config,
        parse_dotted_args(rest),
        args.nproc,
        args.straggler,
        args.slowdown,
        out,
        args.runs,
        args.timeout,
        on_result=lambda run: print(format_row(run), flush=True),
    )
    json_path, png_path = write_outputs(report, out)
    comparison = report["comparison"]
    if comparison:
        ratios = ", ".join(
            f"{name} {ratio:.2f}x" if ratio is not None else f"{name} never"
            for name, ratio in comparison["time_to_target_vs_ddp"].items()
        )
        target = comparison["target_val_loss"]
        print(
            f"time to reach ddp's final val loss + 0.05 ({target:.4f}), as a fraction of "
            f"ddp's wall time: {ratios}"
        )
        print(f"best: {comparison['best']}; 0.7x target met: {comparison['met_0.7x']}")
    print(f"wrote {json_path} and {png_path}")
    return 0
