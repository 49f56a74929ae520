"""Start a multi-process job through torchrun, the real launcher: every rank runs
`python -m clusterlm <command> ...` with the same arguments, minus these launch options."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from clusterlm.errors import UserError


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launch (through torchrun)")
    group.add_argument("--nproc", type=int, default=0, help="processes per node (0 = this process only)")
    group.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job")
    group.add_argument("--rdzv-endpoint", default="127.0.0.1:0",
                       help="HOST:PORT of the rendezvous (port 0 = pick a free one; single node)")
    group.add_argument("--max-restarts", type=int, default=0, help="restart the whole group this often on failure")


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")


def without_launch_arguments(argv: list[str]) -> list[str]:
    """The command line each rank gets: everything but the launcher's own options."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in LAUNCH_OPTIONS:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def torchrun_command(args: argparse.Namespace, command_argv: list[str]) -> list[str]:
    """``command_argv`` is the clusterlm command line, e.g. ['train', '--config', ...]."""
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
               f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.nnodes == "1" and args.rdzv_endpoint.endswith(":0"):
        command.append("--standalone")  # loopback rendezvous on a free port
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
    return [*command, "-m", "clusterlm", *without_launch_arguments(command_argv)]


def run_torchrun(args: argparse.Namespace, command_argv: list[str]) -> int:
    env = dict(os.environ)
    # Restarted groups reuse the agent's store otherwise, and their gloo setup then often fails.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One intra-op thread per process unless the user chose: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call(torchrun_command(args, command_argv), env=env)
