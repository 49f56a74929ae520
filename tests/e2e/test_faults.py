"""Surviving failures as a user meets them: preemption signals, a stopped rank, random SIGKILLs.

Every job here runs through the real launcher (torchrun) or as a real process, and is signalled
for real. Processes a test stops or starts are ended by pid.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from launch_helpers import TINY, clusterlm

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.config import build_config
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import train

FAST = [*TINY, "--training.log_interval", "1", "--metrics.plot", "false"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_for_inference(find_checkpoint(str(run)), device="cpu").model.parts[0].state_dict()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "clusterlm", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _pid_of_rank(out: Path, rank: int) -> int:
    path = out / "heartbeat" / f"rank_{rank:05d}.json"
    _wait_for(lambda: path.is_file() and json.loads(path.read_text()).get("start_step") is not None)
    return json.loads(path.read_text())["pid"]


def test_a_preempted_run_resumes_bit_for_bit(launch_data_dir, tmp_path):
    """SIGUSR1 to the process: it saves at the next step boundary, exits 75, and the resumed run
    ends with exactly the weights of an uninterrupted one."""
    values = {
        "data.dir": str(launch_data_dir),
        "training.steps": 40,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 16,
        "training.micro_batch_size": 2,
        "training.eval_interval": 0,
        "metrics.progress": "none",
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops": 1e12,
        "checkpoint.interval": 0,
        "training.precision": "fp32",
    }
    train(build_config(None, {**values, "training.out_dir": str(tmp_path / "whole")}))
    out = tmp_path / "preempted"
    # Slowed (numerics untouched) so that the signal lands well before the last step.
    job = _start(
        [
            "train",
            *(f"--{k}={v}" for k, v in values.items()),
            f"--training.out_dir={out}",
            "--metrics.progress=lines",
            "--training.slow_ranks=0:50",
        ],
        tmp_path / "log",
    )
    _pid_of_rank(out, 0)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=120) == 75, (tmp_path / "log").read_text()[-2000:]
    log = (tmp_path / "log").read_text()
    assert "preempted at step" in log and "after SIGUSR1" in log
    train(build_config(None, {**values, "training.out_dir": str(out), "checkpoint.resume": "auto"}))
    ours, reference = _weights(out), _weights(tmp_path / "whole")
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


def test_sigterm_to_the_launcher_saves_on_every_rank_and_exits_75(launch_data_dir, tmp_path):
    out = tmp_path / "run"
    job = _start(
        [
            "train",
            "--nproc",
            "2",
            "--data.dir",
            str(launch_data_dir),
            "--training.out_dir",
            str(out),
            "--training.steps",
            "100000",
            "--checkpoint.interval",
            "0",
            *FAST,
        ],
        tmp_path / "log",
    )
    _pid_of_rank(out, 1)
    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)
    status = job.wait(timeout=120)
    log = (tmp_path / "log").read_text()
    assert status == 75, log[-3000:]
    assert time.monotonic() - signalled < 60
    assert log.count("preempted at step") == 1
    step = int(log.split("preempted at step ")[1].split(":")[0])
    assert find_checkpoint(str(out)).state["step"] == step


def test_a_stopped_rank_is_reported_by_rank_and_phase(launch_data_dir, tmp_path):
    out, timeout = tmp_path / "run", 4
    job = _start(
        [
            "train",
            "--nproc",
            "2",
            "--data.dir",
            str(launch_data_dir),
            "--training.out_dir",
            str(out),
            "--training.steps",
            "100000",
            "--checkpoint.interval",
            "0",
            "--parallel.hang_timeout_s",
            str(timeout),
            *FAST,
        ],
        tmp_path / "log",
    )
    stopped = _pid_of_rank(out, 1)
    try:
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        _wait_for(lambda: "hang:" in (tmp_path / "log").read_text(), timeout=60)
        detected = time.monotonic() - start
        assert job.wait(timeout=60) != 0
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(stopped, sig)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
    line = next(x for x in (tmp_path / "log").read_text().splitlines() if x.startswith("hang:"))
    assert "rank 1 in phase" in line and "not responding" in line and "ranks 0 wait" in line
    assert detected <= 2 * timeout, f"reported after {detected:.1f} s"


def test_chaos_two_kills_recover_to_identical_weights(launch_data_dir, tmp_path):
    result = clusterlm(
        "chaos",
        "--nproc",
        "2",
        "--kills",
        "2",
        "--max-delay",
        "0.5",
        "--data.dir",
        str(launch_data_dir),
        "--training.out_dir",
        str(tmp_path),
        "--training.steps",
        "300",
        "--checkpoint.interval",
        "10",
        *TINY,
        "--metrics.progress",
        "none",
        "--training.log_interval",
        "50",
        "--training.slow_ranks",
        "0:6,1:6",
        timeout=280,
    )  # slowed: both kills land before the end
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("2/2 recovered, final weights identical: yes, steps recomputed: "), (
        summary
    )
    assert "kills during checkpoint writes: 1" in result.stdout


def test_bench_checkpoint_prints_the_stall_of_both_modes(launch_data_dir, capsys):
    from clusterlm.cli import main

    assert (
        main(
            [
                "bench",
                "checkpoint",
                "--data.dir",
                str(launch_data_dir),
                *TINY,
                "--saves",
                "1",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "synchronous:  stall per save" in out
        and "% of synchronous; written in the background in" in out
    )
