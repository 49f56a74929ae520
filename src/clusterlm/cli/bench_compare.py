"""`clusterlm bench compare-deepspeed`: the command line of
``clusterlm.bench.compare_deepspeed``."""

from __future__ import annotations

from clusterlm.bench.compare_deepspeed import compare, report
from clusterlm.cli.options import Parser
from clusterlm.errors import UserError
from clusterlm.interop.pretrained_shape import load_config

DESCRIPTION = (
    "`clusterlm bench compare-deepspeed`: train the same model on the same batches with DeepSpeed "
    "ZeRO-k and clusterlm zero-k on N local CPU processes, in alternating rounds; print tokens/s "
    "and peak memory growth per rank. Needs the optional extra: pip install 'clusterlm[compare]'."
)


def build_parser() -> Parser:
    parser = Parser(prog="clusterlm bench compare-deepspeed", description=DESCRIPTION)
    parser.add_argument(
        "--config", default="configs/nano-cpu.toml", help="model, data and optimizer settings"
    )
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument(
        "--stages", default="1,2,3", help="ZeRO stages to compare, comma list (default 1,2,3)"
    )
    parser.add_argument(
        "--micro-batch-size", type=int, help="sequences per rank and step (default: the config's)"
    )
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per rank and step (gradient accumulation; default 1)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of separate jobs")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=6,
        help="alternating blocks of --steps steps per framework in the one job that times both",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds before a job is abandoned"
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    stages = sorted({int(s) for s in args.stages.split(",") if s.strip().isdigit()})
    if not stages or not set(stages) <= {1, 2, 3}:
        raise UserError(f"--stages takes ZeRO stages from 1,2,3, got {args.stages!r}")
    if (
        min(args.nproc, args.steps, args.rounds, args.paired_rounds, args.accumulation) < 1
        or args.warmup < 0
    ):
        raise UserError(
            "--nproc, --accumulation, --steps, --rounds and --paired-rounds must be >= 1 and "
            "--warmup >= 0"
        )
    overrides = (
        {"training.micro_batch_size": args.micro_batch_size} if args.micro_batch_size else {}
    )
    cfg = load_config(args.config, overrides)
    results, paired = compare(
        cfg,
        args.nproc,
        stages,
        args.warmup,
        args.steps,
        args.rounds,
        args.timeout,
        args.paired_rounds,
        args.accumulation,
    )
    for line in report(results, paired, args.nproc, args.accumulation):
        print(line)
    return 0
