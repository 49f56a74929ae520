"""`clusterlm jobs`: your clusterlm jobs in Slurm, with state and progress (step, loss, ETA)."""

from __future__ import annotations

from clusterlm.cli.parser import Parser
from clusterlm.launch.jobs import JobStatus, user_jobs


def main(argv: list[str]) -> int:
    Parser(
        prog="clusterlm jobs",
        description="List your clusterlm jobs in Slurm with their progress, "
        "read from each run directory's metrics.jsonl.",
    ).parse_args(argv)
    jobs = user_jobs()
    if not jobs:
        print("no clusterlm jobs")
        return 0
    rows = [("JOB", "STATE", "STEP", "LOSS", "ETA", "RUN")] + [_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
            + "  "
            + row[5]
        )
    return 0


def _row(job: JobStatus) -> tuple[str, str, str, str, str, str]:
    step = f"{job.step or 0}/{job.steps}" if job.steps else "-"
    loss = f"{job.loss:.4f}" if job.loss is not None else "-"
    return job.job_id, job.state, step, loss, _duration(job.eta_s), job.run_dir or "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )
