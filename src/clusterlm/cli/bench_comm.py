"""`clusterlm bench comm`: the command line of ``clusterlm.bench.collective_sweep`` (how it times
and fits)."""

from __future__ import annotations

import argparse

from clusterlm.bench.collective_sweep import fits, measure, parse_sizes
from clusterlm.bench.sweep_report import format_report, plot, write_json
from clusterlm.cli.options import Parser
from clusterlm.comm.allreduce import ALGORITHMS
from clusterlm.errors import UserError

DESCRIPTION = (
    "`clusterlm bench comm`: time all-reduce algorithms over a range of sizes on N local processes."
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clusterlm bench comm", description=DESCRIPTION)
    parser.add_argument("--nproc", type=int, default=4, help="local processes (default 4)")
    parser.add_argument(
        "--algorithms",
        default="native,ring",
        help=f"comma list from: {','.join(ALGORITHMS)} (default native,ring)",
    )
    parser.add_argument(
        "--sizes",
        default="1K..64M",
        help="bytes: MIN..MAX or a comma list, K/M/G suffixes (default 1K..64M)",
    )
    parser.add_argument(
        "--factor",
        type=int,
        default=4,
        choices=(2, 4),
        help="step between sizes of a range (default 4)",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=10,
        help="back-to-back iterations per timed group; more when a group would last under 20 ms, "
        "fewer past 0.25 s (default 10)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed iterations first (default 2)"
    )
    parser.add_argument(
        "--chunk-bytes", type=int, help="pipeline chunk for the ring-based algorithms"
    )
    parser.add_argument(
        "--pipeline-depth", type=int, help="chunks in flight for the ring-based algorithms"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds before the run is abandoned (default 1800)",
    )
    parser.add_argument("--json", help="write measurements and fits to this JSON file")
    parser.add_argument("--plot", help="write a bus-bandwidth plot to this PNG file")
    return parser


def _algorithms(spec: str) -> list[str]:
    algorithms = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise UserError(
            f"unknown algorithm(s) {unknown or algorithms}; choose from: {', '.join(ALGORITHMS)}"
        )
    return algorithms


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    algorithms = _algorithms(args.algorithms)
    if args.nproc < 1 or args.iters < 1 or args.warmup < 0:
        raise UserError("--nproc and --iters must be >= 1 and --warmup >= 0")
    options = {
        k: v
        for k, v in (("chunk_bytes", args.chunk_bytes), ("pipeline_depth", args.pipeline_depth))
        if v is not None
    }
    if any(v < 1 for v in options.values()):
        raise UserError("--chunk-bytes and --pipeline-depth must be >= 1")
    sizes = parse_sizes(args.sizes, args.factor)

    measurements = measure(
        args.nproc, algorithms, sizes, args.iters, args.warmup, options, args.timeout
    )
    fitted = fits(measurements)
    print(format_report(measurements, fitted, args.nproc))
    if args.json:
        write_json(args.json, args.nproc, args.iters, args.warmup, measurements, fitted)
    if args.plot:
        plot(args.plot, measurements, args.nproc)
    return 0
