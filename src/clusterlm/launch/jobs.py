"""This user's clusterlm jobs in Slurm and how far each has got: the queue from squeue (and
finished jobs from sacct where the cluster keeps accounting), the progress from the last record
in each run directory's metrics.jsonl. Slurm keeps the run directory and step count in the job's
comment (see ``SlurmJob.comment``)."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from clusterlm.errors import UserError
from clusterlm.launch.slurm import JOB_NAME, TIMEOUT_S, no_answer, require_command

TAIL_BYTES = 64 * 1024  # the last train record is near the end; never read a long file whole


@dataclass
class JobStatus:
    job_id: str
    state: str
    run_dir: str | None = None
    steps: int | None = None
    step: int | None = None  # the last logged step
    loss: float | None = None
    eta_s: float | None = None  # remaining steps at the last logged speed, while it runs


def user_jobs(user: str | None = None) -> list[JobStatus]:
    """The user's clusterlm jobs, oldest first, each with its progress."""
    require_command("squeue")
    user = user or getpass.getuser()
    squeue = _start(
        [
            "squeue",
            "--noheader",
            "--states=all",
            f"--user={user}",
            f"--name={JOB_NAME}",
            "--format=%i|%T|%k",
        ]
    )
    sacct = (
        _start(
            [
                "sacct",
                "--noheader",
                "--parsable2",
                "--allocations",
                f"--user={user}",
                f"--name={JOB_NAME}",
                "--starttime=now-7days",
                "--format=JobID,State,Comment",
            ]
        )
        if shutil.which("sacct")
        else None
    )
    queued = _rows(squeue, required=True)
    finished = (
        _rows(sacct, required=False) if sacct else {}
    )  # no accounting: only what squeue still holds
    jobs = [_status(job_id, *fields) for job_id, fields in {**finished, **queued}.items()]
    return sorted(jobs, key=lambda job: [int(part) for part in re.findall(r"\d+", job.job_id)])


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(process: subprocess.Popen, required: bool) -> dict[str, tuple[str, str]]:
    """job id -> (state, comment) from 'id|state|comment' lines (the comment may hold '|')."""
    program = cast(list[str], process.args)[0]  # the argv ``_start`` was given
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        if required:
            raise no_answer(program) from None
        return {}
    if process.returncode != 0:
        if required:
            raise UserError(f"{program} failed: {(err.strip().splitlines() or ['?'])[0]}")
        return {}
    rows = {}
    for line in out.splitlines():
        job_id, state, comment = (line.split("|", 2) + ["", ""])[:3]
        if job_id.strip():
            rows[job_id.strip()] = (state.split(" ")[0], comment)  # sacct says "CANCELLED by 0"
    return rows


def _status(job_id: str, state: str, comment: str) -> JobStatus:
    try:
        about = json.loads(comment)
        run_dir = str(about["run"])
        job = JobStatus(job_id, state, run_dir, int(about["steps"]))
    except (ValueError, KeyError, TypeError):
        return JobStatus(
            job_id, state
        )  # not submitted by clusterlm submit, or accounting keeps no comment
    record = last_train_record(Path(run_dir) / "metrics.jsonl")
    if record:
        job.step, job.loss = record.get("step"), record.get("loss")
        if state == "RUNNING" and job.step is not None and record.get("ms_per_step"):
            job.eta_s = max(job.steps - job.step, 0) * record["ms_per_step"] / 1000
    return job


def last_train_record(path: Path) -> dict | None:
    """The newest 'train' record of a metrics.jsonl, read from its tail; None when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first, cut line of the tail, or a line being written
        if isinstance(record, dict) and record.get("kind") == "train":
            return record
    return None
