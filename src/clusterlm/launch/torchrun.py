"""Start a multi-process job through torchrun, the real launcher: every rank runs
`python -m clusterlm <command> ...` with the same arguments, minus the launcher's own options.

torchrun runs as ``python -m clusterlm.launch.agent``: with its ``clusterlm`` rendezvous backend,
so that the rendezvous store binds loopback on one node and the endpoint's host on several
(``clusterlm.launch.rendezvous``), and turning a worker's bad input into one line. The ranks bind
their store as ``clusterlm.distributed.listeners`` says. Every job gets a secret of its own in its
environment (``clusterlm.distributed.job_secret``)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from clusterlm.config import Config
from clusterlm.distributed.job_secret import SECRET_VARIABLE, new_secret
from clusterlm.distributed.listeners import LOOPBACK, interface_of
from clusterlm.distributed.mpi_environment import launched_by_mpi
from clusterlm.errors import UserError
from clusterlm.launch.elastic import node_range
from clusterlm.launch.preflight import preflight
from clusterlm.launch.rendezvous import BACKEND
from clusterlm.launch.signals import preemption_environment, run_forwarding_preemption
from clusterlm.launch.worker_errors import EXIT_USER_ERROR
from clusterlm.observe.watchdog import holds_only_heartbeats, remove_heartbeats
from clusterlm.train.out_dir import launcher_claim

LAUNCH_OPTIONS = (
    "--nproc",
    "--nnodes",
    "--rdzv-endpoint",
    "--max-restarts",
    "--rdzv-id",
    "--local-addr",
    "--rdzv-conf",
)


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int = 0  # processes per node; 0 = run in this process
    nnodes: str = "1"  # nodes, or MIN:MAX for an elastic job
    rdzv_endpoint: str = "127.0.0.1:0"  # port 0: pick a free one (single node)
    max_restarts: int = 0
    rdzv_id: str = "clusterlm"  # the job's name at the rendezvous: the same on every node
    local_addr: str = ""  # this node's address as the others reach it; "" = its hostname
    rdzv_conf: str = ""  # torchrun's KEY=VALUE,... rendezvous settings (timeouts)

    def __post_init__(self) -> None:
        if self.nproc < 0:
            raise UserError(
                "--nproc must be >= 0 (processes per node; 0 = this process only), "
                f"got {self.nproc}"
            )
        if self.max_restarts < 0:
            raise UserError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        malformed = [item for item in self.rdzv_conf.split(",") if item and "=" not in item]
        if malformed:
            raise UserError(
                "--rdzv-conf takes KEY=VALUE[,KEY=VALUE...], e.g. join_timeout=120; "
                f"got {malformed[0]!r}"
            )

    @property
    def launches(self) -> bool:
        """True when this process should start the job rather than be one of its ranks."""
        return self.nproc > 0 and "WORLD_SIZE" not in os.environ and not launched_by_mpi()

    @property
    def standalone(self) -> bool:
        """One node with no endpoint given: a private loopback rendezvous on a free port."""
        return self.nnodes == "1" and self.rdzv_endpoint.endswith(":0")

    def rendezvous_arguments(self) -> list[str]:
        """torchrun's rendezvous options (c10d's, through the ``clusterlm`` backend). On one node
        the store, and MASTER_ADDR, are on loopback; on several, the node whose --local-addr is
        the endpoint's host hosts the rendezvous store (torchrun's own guess compares only
        hostnames)."""
        if self.standalone:
            return [
                f"--rdzv-backend={BACKEND}",
                f"--rdzv-endpoint={LOOPBACK}:0",
                f"--rdzv-id={self.rdzv_id}",
                f"--local-addr={LOOPBACK}",
            ]
        arguments = [
            f"--rdzv-backend={BACKEND}",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--rdzv-id={self.rdzv_id}",
        ]
        conf = [item for item in self.rdzv_conf.split(",") if item]
        if self.local_addr:
            arguments.append(f"--local-addr={self.local_addr}")
            if self.local_addr == self.rdzv_endpoint.rpartition(":")[0] and not any(
                item.startswith("is_host=") for item in conf
            ):
                conf.append("is_host=1")
        return arguments + ([f"--rdzv-conf={','.join(conf)}"] if conf else [])


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
    command = [
        sys.executable,
        "-m",
        "clusterlm.launch.agent",
        f"--nproc-per-node={opts.nproc}",
        f"--nnodes={opts.nnodes}",
        f"--max-restarts={opts.max_restarts}",
    ]
    node_range(opts.nnodes)
    if not opts.standalone and opts.rdzv_endpoint.endswith(":0"):
        raise UserError(
            f"--nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT with a port every node can "
            "reach (port 0 picks a free one only for a single node)"
        )
    return [
        *command,
        *opts.rendezvous_arguments(),
        "-m",
        "clusterlm",
        *without_launch_arguments(command_argv),
    ]


def job_environment(
    opts: LaunchOptions, env: dict[str, str], parameter_server: bool
) -> dict[str, str]:
    """The launcher's environment for the job: its secret (the one exported, which every node of
    a multi-node job must share, or a new one), gloo on the interface of --local-addr, rank 0
    hosting the ranks' store (never the agent, whose store torchrun binds to every interface)."""
    if not env.get(SECRET_VARIABLE):
        if not opts.standalone and parameter_server:
            raise UserError(
                "a parameter-server job on several nodes needs the same "
                f"{SECRET_VARIABLE} on every node: "
                f"export {SECRET_VARIABLE}=<the same random value> on each before "
                "`clusterlm train`, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        env[SECRET_VARIABLE] = new_secret()
    if opts.local_addr and not opts.standalone and "GLOO_SOCKET_IFNAME" not in env:
        interface = interface_of(opts.local_addr)
        if interface:
            env["GLOO_SOCKET_IFNAME"] = interface
    # Restarted groups reuse the agent's store otherwise, and their gloo setup then often fails.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def launch(cfg: Config, opts: LaunchOptions, command_argv: list[str]) -> int:
    """Check the job's inputs and its layout for every size it can have (each of an elastic
    range), then run it through torchrun; returns the launcher's exit status. Bad input fails
    here, once, before any worker."""
    preflight(cfg, opts.nproc, opts.nnodes)
    command = torchrun_command(opts, command_argv)
    env = job_environment(opts, dict(os.environ), cfg.parallel.data_parallel == "ps")
    # One intra-op thread per process unless the user chose: N processes share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc)))
    preemption_environment(env, cfg.checkpoint.preempt_grace_s)
    # A training job on one node: this process holds its out_dir for every rank and restart. Across
    # nodes the launchers cannot tell which of them starts rank 0, so rank 0 takes it.
    trains = command_argv[:1] in (["train"], ["finetune"]) and opts.nnodes == "1"
    fresh = holds_only_heartbeats(cfg.training.out_dir)
    with launcher_claim(cfg, env) if trains else contextlib.nullcontext():
        status = run_forwarding_preemption(command, env)
    if (
        status == EXIT_USER_ERROR and fresh
    ):  # a worker's bad input: the disk as it was, as in one process
        remove_heartbeats(
            cfg.training.out_dir
        )  # what a rank stopped before it cleaned up left behind
    return status
