"""`clusterlm bench prepare`: `prepare` at several process counts on a generated corpus
(``clusterlm.bench.prepare_speed``)."""

from __future__ import annotations

from clusterlm.bench.prepare_speed import bench_prepare
from clusterlm.cli.options import Parser
from clusterlm.cli.prepare import add_cleaning_arguments, cleaning_options
from clusterlm.data.prepare import PrepareOptions
from clusterlm.errors import UserError


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="clusterlm bench prepare",
        description="Time `clusterlm prepare` at several --nproc on one generated corpus.",
    )
    parser.add_argument(
        "--size-mb", type=float, default=50.0, help="size of the generated corpus (default: 50)"
    )
    parser.add_argument(
        "--nproc", default="1,2", help="process counts to time, comma-separated (default: 1,2)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (default: 1)")
    parser.add_argument("--tokenizer", default="char", help="char or bpe (default: char)")
    add_cleaning_arguments(parser)
    args = parser.parse_args(argv)
    try:
        nprocs = [int(n) for n in args.nproc.split(",")]
    except ValueError:
        raise UserError(f"--nproc takes counts like 1,2,4; got {args.nproc!r}") from None
    options = PrepareOptions(
        inputs=(), out="", tokenizer=args.tokenizer, cleaning=cleaning_options(args)
    )
    for line in bench_prepare(options, nprocs, args.size_mb, args.rounds):
        print(line)
    return 0
