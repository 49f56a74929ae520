"""The chaos campaign: prove that a job survives random SIGKILLs bit for bit.

``run_chaos`` trains the job once uninterrupted (``<out_dir>/reference``), then again under
torchrun with ``--max-restarts K`` (``<out_dir>/chaos``) while it kills a random rank with
SIGKILL K times: at a random moment once the group trains, and every second kill the moment a
checkpoint starts writing (its temporary directory appears; a random moment instead when the
writes are too short to catch). The ranks' heartbeat files (see
``clusterlm.observe.watchdog``) say which processes are the current group, where each group
started, and how far the killed one got. At the end the final weights of both runs are compared
bitwise.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clusterlm.checkpoint.directory import list_complete
from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.errors import UserError
from clusterlm.observe.watchdog import all_heartbeats
from clusterlm.train.inference import load_for_inference

POLL_S = 0.002  # checkpoint writes of small models last milliseconds
GROUP_TIMEOUT_S = 600.0
MISSED_WRITES = 3


@dataclass
class ChaosReport:
    kills: int
    recovered: int = 0
    during_writes: int = 0
    recomputed: int = 0
    identical: bool = False
    overhead: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.recovered}/{self.kills} recovered, final weights identical: "
            f"{'yes' if self.identical else 'no'}, steps recomputed: {self.recomputed}, "
            f"wall time overhead: {100 * self.overhead:.0f}%"
        )


def _train_command(
    nproc: int, train_argv: list[str], out_dir: Path, max_restarts: int
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clusterlm",
        "train",
        *train_argv,
        "--nproc",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "--training.out_dir",
        str(out_dir),
    ]


def _group(out_dir: Path, restart: int, nproc: int) -> dict[int, dict] | None:
    """The heartbeats of group ``restart`` once all its ranks train, else None."""
    beats = {
        b["rank"]: b
        for b in all_heartbeats(out_dir / "heartbeat")
        if b["generation"].endswith(f":{restart}") and b.get("start_step") is not None
    }
    return beats if len(beats) == nproc else None


def _wait_for_group(
    job: subprocess.Popen, out_dir: Path, restart: int, nproc: int
) -> dict[int, dict] | None:
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while time.monotonic() < deadline and job.poll() is None:
        group = _group(out_dir, restart, nproc)
        if group:
            return group
        time.sleep(0.1)
    return None


def _wait_for_write(job: subprocess.Popen, checkpoints: Path, seen: set[str]) -> bool:
    """Poll until a checkpoint's temporary directory appears that was not there before. False
    when the job ends, or when MISSED_WRITES checkpoints finished between two polls (a loaded
    machine can sleep through a short write), so the kill then falls back to a random moment
    while steps remain."""
    before = {p.name for p in list_complete(checkpoints)}
    finished: set[str] = set()  # accumulated: older checkpoints are deleted (keep_last)
    while job.poll() is None:
        if checkpoints.is_dir() and {p.name for p in checkpoints.glob(".step_*.tmp")} - seen:
            return True
        finished |= {p.name for p in list_complete(checkpoints)} - before
        if len(finished) >= MISSED_WRITES:
            return False
        time.sleep(POLL_S)
    return False


def _kill_one(
    job,
    out_dir: Path,
    restart: int,
    nproc: int,
    rng: random.Random,
    during_write: bool,
    max_delay_s: float,
    report: ChaosReport,
) -> int | None:
    """Kill a random rank of group ``restart``; returns the step it had reached (None: job over)."""
    group = _wait_for_group(job, out_dir, restart, nproc)
    if group is None:
        return None
    checkpoints = out_dir / "checkpoints"
    seen = {p.name for p in checkpoints.glob(".step_*.tmp")} if checkpoints.is_dir() else set()
    if during_write and _wait_for_write(job, checkpoints, seen):
        report.during_writes += 1
    else:
        time.sleep(rng.uniform(0.0, max_delay_s))
    victim = group[rng.randrange(nproc)]
    step = max(b["step"] for b in (_group(out_dir, restart, nproc) or group).values())
    try:
        os.kill(victim["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return None
    return step


def _kill_and_recover(
    job: subprocess.Popen,
    out_dir: Path,
    nproc: int,
    rng: random.Random,
    write_kills: bool,
    max_delay_s: float,
    report: ChaosReport,
) -> None:
    """Kill a rank ``report.kills`` times (every second kill during a checkpoint write when
    ``write_kills``), each time waiting for the next group; counts in ``report`` the groups that
    came back and the steps they recomputed."""
    for restart in range(report.kills):
        step = _kill_one(
            job,
            out_dir,
            restart,
            nproc,
            rng,
            write_kills and restart % 2 == 1,
            max_delay_s,
            report,
        )
        if step is None:
            report.notes.append(
                f"the job ended before kill {restart + 1}; give it more --training.steps"
            )
            return
        resumed = _wait_for_group(job, out_dir, restart + 1, nproc)
        if resumed is not None:
            report.recovered += 1
            report.recomputed += max(0, step - min(b["start_step"] for b in resumed.values()))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_for_inference(find_checkpoint(str(run)), device="cpu").model.parts[0].state_dict()


def run_chaos(
    nproc: int,
    kills: int,
    train_argv: list[str],
    out_root: Path,
    seed: int = 0,
    max_delay_s: float = 3.0,
    write_kills: bool = True,
) -> ChaosReport:
    reference, chaos = out_root / "reference", out_root / "chaos"
    for run in (reference, chaos):
        if run.exists():
            raise UserError(
                f"{run} exists; chaos writes a fresh reference and chaos run, choose a new "
                "--training.out_dir"
            )
    out_root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out_root / "reference.log", "w") as log:
        status = subprocess.call(
            _train_command(nproc, train_argv, reference, 0), stdout=log, stderr=log
        )
    reference_s = time.monotonic() - start
    if status != 0:
        raise UserError(
            f"the uninterrupted reference run failed with status {status}; "
            f"see {out_root}/reference.log"
        )
    rng, report = random.Random(seed), ChaosReport(kills)
    start = time.monotonic()
    log = open(out_root / "chaos.log", "w")  # noqa: SIM115 - open while the job runs
    job = subprocess.Popen(_train_command(nproc, train_argv, chaos, kills), stdout=log, stderr=log)
    try:
        _kill_and_recover(job, chaos, nproc, rng, write_kills, max_delay_s, report)
        status = job.wait(timeout=GROUP_TIMEOUT_S)
    finally:
        if job.poll() is None:  # torchrun ends its workers on SIGTERM
            job.terminate()
            job.wait(timeout=GROUP_TIMEOUT_S)
        log.close()
    report.overhead = (time.monotonic() - start) / reference_s - 1
    if status != 0:
        report.notes.append(f"the chaos run ended with status {status}; see {out_root}/chaos.log")
        report.recovered = min(report.recovered, kills - 1)
        return report
    ours, theirs = _final_weights(chaos), _final_weights(reference)
    report.identical = ours.keys() == theirs.keys() and all(
        torch.equal(ours[k], theirs[k]) for k in ours
    )
    return report
