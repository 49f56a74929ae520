"""Start a multi-process job through torchrun, the real launcher: every rank runs
`python -m clusterlm <command> ...` with the same arguments, minus the launcher's own options."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from clusterlm.config import Config
from clusterlm.errors import UserError
from clusterlm.launch.signals import preemption_environment, run_forwarding_preemption
from clusterlm.parallel.mesh import check_layout

LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int = 0  # processes per node; 0 = run in this process
    nnodes: str = "1"  # nodes, or MIN:MAX for an elastic job
    rdzv_endpoint: str = "127.0.0.1:0"  # port 0: pick a free one (single node)
    max_restarts: int = 0

    @property
    def launches(self) -> bool:
        """True when this process should start the job rather than be one of its ranks."""
        return self.nproc > 0 and "WORLD_SIZE" not in os.environ

    def world_sizes(self) -> list[int]:
        """The job's sizes: one, or the smallest and largest of an elastic range."""
        try:
            low, _, high = self.nnodes.partition(":")
            nodes = sorted({int(low), int(high or low)})
        except ValueError:
            raise UserError(f"--nnodes takes N or MIN:MAX, got {self.nnodes!r}") from None
        if nodes[0] < 1:
            raise UserError(f"--nnodes must be at least 1, got {self.nnodes!r}")
        return [n * self.nproc for n in nodes]


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


def torchrun_command(opts: LaunchOptions, command_argv: list[str]) -> list[str]:
    """``command_argv`` is the clusterlm command line, e.g. ['train', '--config', ...]."""
    if opts.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {opts.nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc}",
               f"--nnodes={opts.nnodes}", f"--max-restarts={opts.max_restarts}"]
    if opts.nnodes == "1" and opts.rdzv_endpoint.endswith(":0"):
        command.append("--standalone")  # loopback rendezvous on a free port
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={opts.rdzv_endpoint}"]
    return [*command, "-m", "clusterlm", *without_launch_arguments(command_argv)]


def launch(cfg: Config, opts: LaunchOptions, command_argv: list[str]) -> int:
    """Check the layout for every size the job can have, then run it through torchrun; returns
    the launcher's exit status. A layout that cannot run fails here, once, before any worker."""
    for world_size in opts.world_sizes():
        check_layout(cfg, world_size)
    env = dict(os.environ)
    # Restarted groups reuse the agent's store otherwise, and their gloo setup then often fails.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One intra-op thread per process unless the user chose: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc)))
    preemption_environment(env, cfg.checkpoint.preempt_grace_s)
    return run_forwarding_preemption(torchrun_command(opts, command_argv), env)
