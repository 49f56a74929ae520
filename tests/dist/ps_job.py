"""A parameter-server job on real processes, launched as torchrun launches them (RANK,
WORLD_SIZE, MASTER_ADDR/PORT, the job's secret, and a TCPStore this process hosts, as the
launcher's agent would), so that a test can kill and restart ranks and reach the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlm.distributed.job_secret import SECRET_VARIABLE, new_secret
from clusterlm.distributed.listeners import hosted_store

TIMEOUT_S = 240


class Job:
    """``world`` ranks of ``python -m clusterlm train`` around a store this process hosts."""

    def __init__(self, values: dict, world: int, tmp: Path):
        self.store = hosted_store("127.0.0.1", 0, "127.0.0.1", timeout_s=TIMEOUT_S, wait_for_workers=False)
        self.env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(sys.path), SECRET_VARIABLE: new_secret()}
        self.args = [a for key, value in values.items() for a in (f"--{key}", str(value))]
        self.tmp = tmp
        self.procs = {rank: self.start(rank) for rank in range(world)}

    def start(self, rank: int) -> subprocess.Popen:
        with open(self.tmp / f"rank{rank}.{time.monotonic_ns()}.log", "w") as log:  # the child keeps its copy
            return subprocess.Popen([sys.executable, "-m", "clusterlm", "train", *self.args], stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env={**self.env, "RANK": str(rank), "LOCAL_RANK": str(rank)})

    def wait(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for rank, proc in self.procs.items():
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                assert code == 0, f"rank {rank} exited {code}:\n{self.logs()}"
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("rank*.log")))


def records(out: Path) -> list[dict]:
    """The metrics written so far (a line being written is left out)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(condition, job: Job, what: str, spare: tuple[int, ...] = ()) -> None:
    """Poll ``condition``; fail with the ranks' logs when a rank not in ``spare`` fails or time runs out."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for r, p in job.procs.items() if r not in spare):
            job.kill()
            pytest.fail(f"waiting for {what}:\n{job.logs()}")
        time.sleep(0.2)
