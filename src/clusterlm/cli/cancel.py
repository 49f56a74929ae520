"""`clusterlm cancel JOB`: cancel one of your clusterlm jobs in Slurm."""

from __future__ import annotations

from clusterlm.cli.parser import Parser
from clusterlm.launch.slurm import cancel


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="clusterlm cancel", description="Cancel one of your clusterlm jobs in Slurm."
    )
    parser.add_argument("job", help="the job id (`clusterlm jobs` lists them)")
    job_id = parser.parse_args(argv).job
    cancel(job_id)
    print(f"cancelled job {job_id}")
    return 0
