"""A private single-node Slurm for tests: its own munge key and munged socket, slurm.conf, ports,
state and spool directories, all under one temporary directory; munged, slurmctld and slurmd run
as this process's children and are stopped by the pids started here.

Tests that need a real system call ``require_real_system``: without root or without the
packages they skip with the reason, and with CI=true they fail instead.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SLURM_COMMANDS = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "sinfo",
    "scancel",
)


def require_real_system(what: str, commands: tuple[str, ...]) -> None:
    """Skip (fail with CI=true) unless running as root with ``commands`` installed."""
    missing = [c for c in commands if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    reason = None
    if os.geteuid() != 0:
        reason = f"{what} needs root (its daemons run as root here)"
    elif missing:
        reason = (
            f"{what} is not installed ({', '.join(missing)} missing): "
            "`make test` installs it as root"
        )
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: a skip is a failure)")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class PrivateSlurm:
    """``start()`` brings up munged, slurmctld and slurmd and waits until the node is idle;
    ``stop()`` ends them by pid. ``env`` points Slurm's client commands at this cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "socket"
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self._start_munge()
        self.conf.write_text(self._config())
        (self.root / "plugstack.conf").write_text("")
        for daemon in ("slurmctld", "slurmd"):
            self._spawn(daemon, [_sbin(daemon), "-D", "-f", str(self.conf)])
        self._wait_until_idle()

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={munge / 'pid'}",
                f"--seed-file={munge / 'seed'}",
                f"--log-file={munge / 'log'}",
            ],
        )
        self._wait(lambda: self.socket.exists(), "munged's socket")

    def _config(self) -> str:
        host, root = socket.gethostname(), self.root
        return f"""\
ClusterName=clusterlmtest
# Jobs derive their rendezvous port from the id: a random first id keeps two such clusters apart.
FirstJobId={random.randint(1000, 999_999)}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.processes.append(
            subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        )
        log.close()

    def _wait_until_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()
            return out == ["idle"]

        self._wait(idle, "the node to be idle in sinfo")

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"private Slurm: no {what} "
                    f"({'exited: ' + ', '.join(dead) if dead else 'timeout'})"
                    f"\n{self.logs()}"
                )
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr}")
        return result

    def _cancel_jobs(self) -> None:
        active = "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,REQUEUED,RESIZING,CONFIGURING"
        if self.run("squeue", "--noheader", active, "--format=%i", check=False).stdout.split():
            self.run("scancel", "--user=root", check=False)
            try:
                self._wait(
                    lambda: (
                        not self.run(
                            "squeue", "--noheader", active, "--format=%i", check=False
                        ).stdout.split()
                    ),
                    "end of the cancelled jobs",
                )
            except RuntimeError:
                pass  # stop the daemons regardless

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(
                f"--- {path.name}\n"
                + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still running (slurmstepd outlives slurmd), then stop slurmd, slurmctld
        and munged by the pids started here."""
        if all(p.poll() is None for p in self.processes):
            self._cancel_jobs()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.processes.clear()
