"""`clusterlm bench speedrun`: the command line of ``clusterlm.bench.speedrun``."""

from __future__ import annotations

from clusterlm.bench.speedrun import report, speedrun
from clusterlm.cli.options import Parser
from clusterlm.errors import UserError
from clusterlm.interop.pretrained_shape import load_config

DESCRIPTION = (
    "`clusterlm bench speedrun`: wall time to a target validation loss for a config and a "
    "baseline, trained one after the other in this process, compilation and evaluations included."
)


def build_parser() -> Parser:
    parser = Parser(prog="clusterlm bench speedrun", description=DESCRIPTION)
    parser.add_argument("--config", default="configs/speedrun-cpu.toml", help="the config to time")
    parser.add_argument("--against", default="configs/nano-cpu.toml", help="the baseline config")
    parser.add_argument(
        "--target", type=float, default=1.89, help="validation loss to reach (default 1.89)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds of baseline and config"
    )
    parser.add_argument(
        "--data-dir", help="prepared data directory for both (default: each config's data.dir)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.target <= 0:
        raise UserError(
            f"--rounds must be >= 1 and --target > 0, got {args.rounds} and {args.target}"
        )
    overrides = {"data.dir": args.data_dir} if args.data_dir else {}
    cfg, baseline = (load_config(path, overrides) for path in (args.config, args.against))
    for line in report(speedrun(cfg, baseline, args.target, args.rounds), args.target):
        print(line)
    return 0
