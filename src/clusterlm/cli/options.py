"""Command lines that describe a training job: `--config FILE`, `--resume`, dotted overrides
(`--training.steps 200`) and the launcher's options, parsed into ``(Config, LaunchOptions)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from clusterlm.cli.parser import Parser
from clusterlm.config import Config, all_keys
from clusterlm.errors import UserError
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.launch import LaunchOptions


@dataclass
class JobArguments:
    cfg: Config
    launch: LaunchOptions
    args: argparse.Namespace  # the command's own options


def parse_job(
    argv: list[str],
    prog: str,
    description: str,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
    shorthands: dict[str, tuple[str, str]] | None = None,
    flags: dict[str, tuple[str, str]] | None = None,
) -> JobArguments | None:
    """The config and launch options of ``argv``; None when it asked for --help or
    --print-config, which are printed here. ``add_options`` adds the command's own options;
    ``shorthands`` maps more options to the config keys they set:
    {"--task": ("finetune.task", help)}; ``flags`` maps options without a value to the boolean
    keys they set true."""
    shorthands = {"--resume": ("checkpoint.resume", "none | auto | PATH"), **(shorthands or {})}
    flags = flags or {}
    parser = _job_parser(prog, description, shorthands, flags, add_options)
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return None
    cfg = load_config(args.config, _overrides(args, rest, shorthands, flags))
    if args.print_config:
        print(cfg.to_json())
        return None
    launch = LaunchOptions(
        args.nproc,
        args.nnodes,
        args.rdzv_endpoint,
        args.max_restarts,
        args.rdzv_id,
        args.local_addr,
        args.rdzv_conf,
    )
    return JobArguments(cfg, launch, args)


def _job_parser(
    prog: str,
    description: str,
    shorthands: dict[str, tuple[str, str]],
    flags: dict[str, tuple[str, str]],
    add_options: Callable[[argparse.ArgumentParser], None] | None,
) -> Parser:
    """The parser of a job's command line: config, shorthands, flags, the command's own options
    and the launcher's; --help lists every config key after them."""
    parser = Parser(
        prog=prog,
        description=description,
        add_help=False,
        epilog="config keys (--section.key VALUE, defaults shown):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-h", "--help", action="store_true", help="show this help and every config key"
    )
    parser.add_argument("--config", help="TOML file of settings (see configs/*.toml)")
    for option, (key, meaning) in shorthands.items():
        parser.add_argument(
            option,
            dest=f"shorthand:{key}",
            metavar=key.rpartition(".")[2].upper(),
            help=f"{meaning} (shorthand for --{key})",
        )
    for option, (key, meaning) in flags.items():
        parser.add_argument(
            option, dest=f"flag:{key}", action="store_true", help=f"{meaning} (--{key} true)"
        )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    if add_options is not None:
        add_options(parser)
    _add_launch_arguments(parser)
    return parser


def _overrides(
    args: argparse.Namespace,
    rest: list[str],
    shorthands: dict[str, tuple[str, str]],
    flags: dict[str, tuple[str, str]],
) -> dict[str, str]:
    """The dotted overrides left in ``rest``, plus the config keys its shorthands and flags set."""
    overrides = parse_dotted_args(rest)
    for key, _ in shorthands.values():
        value = getattr(args, f"shorthand:{key}")
        if value is not None:
            overrides[key] = value
    overrides.update({key: "true" for key, _ in flags.values() if getattr(args, f"flag:{key}")})
    return overrides


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (through torchrun)")
    group.add_argument(
        "--nproc", type=int, default=0, help="processes per node (0 = this process only)"
    )
    group.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job")
    group.add_argument(
        "--rdzv-endpoint",
        default="127.0.0.1:0",
        help="HOST:PORT of the rendezvous (port 0 = pick a free one; single node)",
    )
    group.add_argument(
        "--max-restarts", type=int, default=0, help="restart the whole group this often on failure"
    )
    group.add_argument(
        "--rdzv-id",
        default="clusterlm",
        help="the job's name at the rendezvous, the same on every node",
    )
    group.add_argument(
        "--local-addr",
        default="",
        help="this node's address as the other nodes reach it (default: its hostname); the node "
        "whose address is the rendezvous host hosts the rendezvous",
    )
    group.add_argument(
        "--rdzv-conf",
        default="",
        help="torchrun rendezvous settings KEY=VALUE,... e.g. last_call_timeout=5,join_timeout=120",
    )


OVERWRITE = {
    "--overwrite": (
        "checkpoint.overwrite",
        "start afresh in an out_dir holding an earlier run's checkpoints, deleting them",
    )
}


def parse_dotted_args(args: list[str]) -> dict[str, str]:
    """['--training.steps', '200', '--optim.lr=3e-4']
    -> {'training.steps': '200', 'optim.lr': '3e-4'}."""
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        values[key] = value
    return values


def help_text() -> str:
    """Every option with its default and meaning, grouped by section, for --help."""
    lines = []
    current = None
    for key, f in all_keys().items():
        section = key.split(".")[0]
        if section != current:
            lines.append(f"\n[{section}]")
            current = section
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" ({' | '.join(choices)})" if choices else "")
        lines.append(f"  --{key:<34} {f.default!r:<24} {meaning}")
    return "\n".join(lines)
