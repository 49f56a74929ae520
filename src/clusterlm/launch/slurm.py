"""Slurm as the launcher: an sbatch script that runs one torchrun per node, submitted with sbatch,
listed with squeue (and sacct where accounting is on), cancelled with scancel.

Every node's torchrun meets the others (c10d rendezvous, through ``clusterlm.launch.agent``, whose
store binds the first host's address) on the first host of the allocation, on a port derived
from the job id. The script draws the job's secret from /dev/urandom when it starts (each run,
requeues included, gets a new one) and exports it to every node's ranks, without printing it or
writing it into the script that Slurm keeps. The job trains with ``--resume auto``, so when it is
requeued it continues from the newest checkpoint in its run directory. Before the time limit
Slurm sends USR1 to the batch script (``--signal=B:USR1@GRACE``), which passes it to the ranks
(they checkpoint and exit), waits for them, and puts the job back in the queue.

Every user value in the script is quoted with ``shlex.quote``; the values Slurm reads from
``#SBATCH`` lines (which it does not parse as a shell would) are checked against strict patterns,
and the run directory travels on sbatch's own argument vector, never through a shell.
"""

from __future__ import annotations

import getpass
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clusterlm.distributed.job_secret import SECRET_VARIABLE
from clusterlm.distributed.mpi_environment import PORT_BASE, PORT_SPAN
from clusterlm.errors import UserError

JOB_NAME = "clusterlm"
# Slurm's MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS
TIME_PATTERN = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
PARTITION_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
JOB_ID_PATTERN = re.compile(r"\d+(_\d+)?")
# clusterlm.launch.agent's rendezvous backend (not imported: `jobs` and `cancel` stay light)
BACKEND = "clusterlm"
# torchrun passes these on to its workers
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
TIMEOUT_S = 10  # for Slurm's client commands; a live controller answers in well under a second


@dataclass(frozen=True)
class SlurmJob:
    """One training job: ``train_argv`` are `clusterlm train` options; ``run_dir`` is its
    training.out_dir (absolute) and ``steps`` its training.steps, for `clusterlm jobs`."""

    nodes: int
    procs_per_node: int
    train_argv: list[str]
    run_dir: str
    steps: int
    time: str = ""  # Slurm's time limit; "" = the partition's
    partition: str = ""  # "" = the cluster's default
    grace_s: int = 120  # USR1 comes this long before the time limit
    gpus_per_node: int = 0
    python: str = field(default=sys.executable)

    def __post_init__(self) -> None:
        for name, value in (("--nodes", self.nodes), ("--procs-per-node", self.procs_per_node)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise UserError(
                f"--gpus-per-node must be a whole number of at least 0, got {self.gpus_per_node!r}"
            )
        if self.time and not TIME_PATTERN.fullmatch(self.time):
            raise UserError(
                f"--time takes Slurm's MINUTES, H:MM:SS, D-H or D-H:MM:SS, got {self.time!r}"
            )
        if self.partition and not PARTITION_PATTERN.fullmatch(self.partition):
            raise UserError(
                "--partition takes a partition name (letters, digits, _ . -), "
                f"got {self.partition!r}"
            )
        if not 15 <= self.grace_s <= 65535:
            raise UserError(
                "--grace must be 15 to 65535 seconds (time to checkpoint and requeue), "
                f"got {self.grace_s}"
            )
        if self.time and time_limit_s(self.time) <= self.grace_s:
            raise UserError(
                f"--time {self.time} is not longer than --grace {self.grace_s} s: the job would be "
                "told to stop before it starts; give more time or a shorter --grace"
            )
        if "%" in self.run_dir:
            raise UserError(
                f"training.out_dir {self.run_dir!r} contains '%', which Slurm reads as a file name "
                "pattern; choose a directory without it"
            )

    @property
    def comment(self) -> str:
        """What `clusterlm jobs` needs to find the job's progress, kept by Slurm as the comment."""
        return json.dumps({"run": self.run_dir, "steps": self.steps})

    @property
    def log_path(self) -> str:
        return f"{self.run_dir}/slurm-%j.out"


def time_limit_s(text: str) -> int:
    """Seconds of a Slurm time limit: 'M', 'M:S', 'H:M:S', 'D-H', 'D-H:M', 'D-H:M:S'."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        units = [3600, 60, 1][: len(parts)]
    else:
        units = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(parts)]
    return int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units, strict=True))


# The script's traps: USR1 checkpoints and requeues the job, TERM waits for the ranks to stop.
SIGNAL_TRAPS = (
    (
        "# USR1: the time limit is near (or someone sent it): "
        "the ranks checkpoint and exit, then the job requeues."
    ),
    "checkpoint_and_requeue() {",
    (
        '    echo "clusterlm: USR1 at $(date +%FT%T): '
        'the ranks checkpoint; then job $SLURM_JOB_ID is requeued" >&2'
    ),
    '    scancel --signal=USR1 "$SLURM_JOB_ID"',
    '    wait "$ranks"',
    '    scontrol requeue "$SLURM_JOB_ID"',
    "    exit 0",
    "}",
    "trap checkpoint_and_requeue USR1",
    "# TERM (cancelled, preempted): Slurm signals the ranks itself; let them finish saving.",
    """trap 'echo "clusterlm: TERM: waiting for the ranks to stop" >&2' TERM""",
)


def batch_script(job: SlurmJob) -> str:
    """The sbatch script: directives, then one torchrun per node under srun, with the signal
    handling that checkpoints and requeues before the time limit."""
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {d}" for d in _directives(job)),
            *_node_setup(job),
            "",
            *SIGNAL_TRAPS,
            "",
            # srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 and later): every CPU
            # to the node's torchrun.
            (
                'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" '
                "--kill-on-bad-exit=1 \\"
            ),
            "    " + " ".join(_torchrun_argv(job)) + " &",
            "ranks=$!",
            'wait "$ranks"; status=$?',
            (
                'while kill -0 "$ranks" 2>/dev/null; do wait "$ranks"; status=$?; done'
                "  # a trap ended the wait early"
            ),
            'exit "$status"',
            "",
        ]
    )


def _directives(job: SlurmJob) -> list[str]:
    """The script's ``#SBATCH`` options: the allocation, the USR1 before the time limit, requeue."""
    directives = [
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={job.procs_per_node}",
        f"--signal=B:USR1@{job.grace_s}",
        "--requeue",
        "--open-mode=append",
    ]
    directives += [f"--time={job.time}"] * bool(job.time)
    directives += [f"--partition={job.partition}"] * bool(job.partition)
    directives += [f"--gpus-per-node={job.gpus_per_node}"] * bool(job.gpus_per_node)
    return directives


def _node_setup(job: SlurmJob) -> list[str]:
    """The script's lines before the traps: the rendezvous host and port, the job's secret and
    the threads of each rank."""
    return [
        (
            "# One torchrun per node; they meet on the first node. "
            "A requeued job resumes from the newest checkpoint."
        ),
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"port=${{MASTER_PORT:-$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))}}",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarted groups set up gloo reliably",
        ("# The job's secret, new for every run of the script; srun passes it on. Never print it."),
        f"{SECRET_VARIABLE}=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')",
        (
            f'[ "${{#{SECRET_VARIABLE}}}" -eq 64 ] || '
            '{ echo "clusterlm: cannot read /dev/urandom" >&2; exit 1; }'
        ),
        f"export {SECRET_VARIABLE}",
        f"threads=$(( ${{SLURM_CPUS_PER_TASK:-{job.procs_per_node}}} / {job.procs_per_node} ))",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"',
    ]


def _torchrun_argv(job: SlurmJob) -> list[str]:
    """Each node's command line, quoted for the shell: clusterlm's torchrun agent, which runs
    `clusterlm train` in every rank, resuming from the newest checkpoint."""
    return [
        shlex.quote(job.python),
        "-m",
        "clusterlm.launch.agent",
        '--nnodes="$SLURM_JOB_NUM_NODES"',
        f"--nproc-per-node={job.procs_per_node}",
        f"--rdzv-backend={BACKEND}",
        '--rdzv-endpoint="$head_node:$port"',
        '--rdzv-id="$SLURM_JOB_ID"',
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={job.grace_s - 10}",
        "-m",
        "clusterlm",
        "train",
        *map(shlex.quote, job.train_argv),
        "--resume",
        "auto",
    ]


def sbatch_command(job: SlurmJob) -> list[str]:
    """sbatch's argument vector; the script comes on its standard input."""
    return [
        "sbatch",
        "--parsable",
        f"--job-name={JOB_NAME}",
        f"--comment={job.comment}",
        f"--output={job.log_path}",
    ]


def submit(job: SlurmJob) -> str:
    """Submit the job; returns its id. The run directory is created to hold Slurm's log."""
    require_command("sbatch")
    if job.partition:
        check_partition(job.partition)
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    out = run_slurm(sbatch_command(job), input=batch_script(job))
    return out.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def check_partition(name: str) -> None:
    require_command("scontrol")
    result = _call(["scontrol", "show", "partition", name])
    if result.returncode != 0:
        known = (
            _call(["sinfo", "--noheader", "--format=%R"]).stdout.split()
            if shutil.which("sinfo")
            else []
        )
        choices = f"; this cluster has: {', '.join(sorted(set(known)))}" if known else ""
        raise UserError(f"Slurm has no partition {name!r}{choices}")


def cancel(job_id: str) -> None:
    """Cancel one of this user's clusterlm jobs (never another job the id might name by mistake)."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise UserError(f"a Slurm job id is a number such as 1234, got {job_id!r}")
    require_command("squeue")
    found = _call(
        ["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%j|%u"]
    ).stdout.split()
    if f"{JOB_NAME}|{getpass.getuser()}" not in found:
        raise UserError(
            f"job {job_id} is not one of your clusterlm jobs in Slurm's queue; "
            "`clusterlm jobs` lists them"
        )
    run_slurm(["scancel", job_id])


def run_slurm(argv: list[str], input: str | None = None) -> str:
    """Run a Slurm client command; its stdout, or its first error line as a UserError."""
    result = _call(argv, input)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise UserError(
            f"{argv[0]} failed: {lines[0] if lines else f'exit status {result.returncode}'}"
        )
    return result.stdout


def _call(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise no_answer(argv[0]) from None


def no_answer(command: str) -> UserError:
    return UserError(
        f"{command} did not answer in {TIMEOUT_S} s: "
        "is slurmctld up, and SLURM_CONF right if it is set?"
    )


def require_command(command: str) -> None:
    if shutil.which(command) is None:
        raise UserError(
            f"Slurm is not installed here ({command} is not on PATH): "
            "run on the cluster's login node, or install Slurm's client commands "
            "(Debian: apt-get install slurm-client)"
        )
