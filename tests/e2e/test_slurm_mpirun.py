"""Slurm and mpirun as launchers, against the real systems: a private single-node Slurm runs a
2-process job that is interrupted (USR1, as before a time limit), requeued and resumed; mpirun
starts 2 ranks. Both are compared with one process on the same global batch (relative 1e-5 on
every step's loss, as the layout tests state)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from private_slurm import SLURM_COMMANDS, PrivateSlurm, require_real_system

from clusterlm.cli import main as cli

STEPS, INTERVAL = 40, 5
COMMON = [
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "16",
    "--training.steps",
    str(STEPS),
    "--training.eval_batches",
    "2",
    "--training.eval_interval",
    "0",
    "--training.log_interval",
    "1",
    "--optim.warmup_steps",
    "3",
    "--optim.lr",
    "3e-3",
    "--metrics.progress",
    "lines",
    "--metrics.tensorboard",
    "false",
    "--metrics.plot",
    "false",
    "--metrics.peak_flops",
    "1e12",
    "--training.threads",
    "1",
    "--training.precision",
    "fp32",
]
TWO_RANKS = [*COMMON, "--training.micro_batch_size", "2", "--parallel.data_parallel", "ddp"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-corpus")
    (root / "text.txt").write_text(
        "".join(f"line {i}: to be or not to be, {i * 7 % 13}\n" for i in range(3000))
    )
    assert (
        cli(["prepare", str(root / "text.txt"), "--out", str(root / "data"), "--workers", "1"]) == 0
    )
    return root / "data"


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[int, float]:
    """One process with the 2-rank job's global batch (2 x 2 sequences), uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    assert (
        cli(
            [
                "train",
                "--data.dir",
                str(data_dir),
                "--training.out_dir",
                str(out),
                *COMMON,
                "--training.micro_batch_size",
                "4",
                "--checkpoint.interval",
                "0",
                "--metrics.progress",
                "none",
            ]
        )
        == 0
    )
    return losses(out)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def assert_same_losses(candidate: dict[int, float], reference: dict[int, float]) -> None:
    assert candidate.keys() == reference.keys()
    for step, loss in reference.items():
        assert candidate[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_real_system("Slurm (slurm-wlm, munge)", SLURM_COMMANDS)
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = PrivateSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(
    condition, what: str, slurm: PrivateSlurm, timeout: float = 240, poll: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{slurm.logs()}")
        time.sleep(poll)


def wait_until_ended(slurm: PrivateSlurm, job_id: str, log: Path) -> str:
    """The job's final state; a requeued job passes through PENDING and RUNNING again."""
    ended = (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    )
    wait_for(lambda: job_field(slurm, job_id, "JobState") in ended, f"job {job_id} to end", slurm)
    state = job_field(slurm, job_id, "JobState")
    assert state == "COMPLETED", (
        f"job {job_id} {state}:\n{log.read_text()[-3000:] if log.exists() else ''}"
    )
    return state


def job_field(slurm: PrivateSlurm, job_id: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", slurm.run("scontrol", "show", "job", job_id).stdout)
    return match.group(1) if match else ""


def test_slurm_job_is_requeued_before_its_time_limit_and_resumes_with_the_same_losses(
    slurm, data_dir, reference, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    out = tmp_path / "run"
    assert (
        cli(
            [
                "submit",
                "--scheduler",
                "slurm",
                "--nodes",
                "1",
                "--procs-per-node",
                "2",
                "--time",
                "10",
                "--",
                "--data.dir",
                str(data_dir),
                "--training.out_dir",
                str(out),
                *TWO_RANKS,
                "--checkpoint.interval",
                str(INTERVAL),
                "--training.slow_ranks",
                "0:6",
            ]
        )
        == 0
    )  # time to signal it mid-run
    job_id = capsys.readouterr().out.strip()
    log = out / f"slurm-{job_id}.out"
    first = out / "checkpoints" / f"step_{INTERVAL:08d}" / "complete.json"
    started = time.monotonic()
    wait_for(
        lambda: (
            first.exists()
            or (time.monotonic() - started > 5 and log.exists() and "Traceback" in log.read_text())
        ),
        "the first checkpoint",
        slurm,
        poll=0.05,
    )
    assert first.exists(), log.read_text()[-3000:]
    # What Slurm does --grace seconds before the time limit (--signal=B:USR1@GRACE), sent now.
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    wait_until_ended(slurm, job_id, log)
    text = log.read_text()
    assert job_field(slurm, job_id, "Restarts") == "1", (
        "finished before USR1 came?\n" + text[-3000:]
    )
    assert "USR1" in text and "resumed from" in text, text[-3000:]
    resumed_at = int(re.search(r"resumed from \S+step_(\d+) at step", text).group(1))
    assert INTERVAL <= resumed_at < STEPS
    assert_same_losses(losses(out), reference)

    assert cli(["jobs"]) == 0
    listed = capsys.readouterr().out
    row = next(line for line in listed.splitlines() if line.startswith(job_id + " "))
    assert row.split()[1:3] == ["COMPLETED", f"{STEPS}/{STEPS}"] and str(out) in row, listed


def test_slurm_bad_partition_and_cancel(slurm, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    train = ["--data.dir", str(data_dir), "--training.out_dir", str(tmp_path / "run"), *TWO_RANKS]
    submit = ["submit", "--scheduler", "slurm", "--nodes", "1", "--procs-per-node", "2"]
    assert cli([*submit, "--partition", "nope", "--", *train]) == 2
    assert "Slurm has no partition 'nope'; this cluster has: debug" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # Long enough to be surely still in the queue when cancelled.
    assert cli([*submit, "--", *train, "--training.steps", "100000"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert cli(["cancel", job_id]) == 0
    wait_for(
        lambda: job_field(slurm, job_id, "JobState") == "CANCELLED",
        "the cancelled job",
        slurm,
        timeout=60,
    )
    assert cli(["cancel", "999999"]) == 2
    assert "not one of your clusterlm jobs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def openmpi() -> None:
    require_real_system("OpenMPI (openmpi-bin)", ("mpirun",))


def test_mpirun_ranks_train_like_one_process(openmpi, data_dir, reference, tmp_path):
    out = tmp_path / "run"
    command = [
        "mpirun",
        "-np",
        "2",
        "--allow-run-as-root",
        "--oversubscribe",
        "-x",
        "OMP_NUM_THREADS=1",
        sys.executable,
        "-m",
        "clusterlm",
        "train",
        "--data.dir",
        str(data_dir),
        "--training.out_dir",
        str(out),
        *TWO_RANKS,
        "--checkpoint.interval",
        "0",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"done: step {STEPS}") == 1  # rank 0 alone reports
    assert "2 processes" in result.stderr
    assert_same_losses(losses(out), reference)
