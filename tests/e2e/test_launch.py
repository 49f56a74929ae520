"""Multi-process jobs through the real launcher (torchrun), and bad launch environments."""

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launch_helpers import TINY, clusterlm

from clusterlm.config import ParallelConfig
from clusterlm.config.degrees import resolve_degrees
from clusterlm.errors import UserError


def test_bench_train_reports_the_pipeline_bubble_next_to_the_formula(launch_data_dir):
    """Also the step breakdown: every rank runs the profiled steps (they hold the pipeline's
    transfers), so the job finishes, and rank 0 alone prints it."""
    result = clusterlm(
        "bench",
        "train",
        "--nproc",
        "2",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--data.dir",
        str(launch_data_dir),
        "--parallel.pp",
        "2",
        "--parallel.pp_microbatches",
        "4",
        "--parallel.pp_schedule",
        "1f1b",
        *TINY,
        "--training.micro_batch_size",
        "4",
        "--breakdown",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline bubble (1f1b, p=2, m=4, v=1): measured" in result.stdout
    assert "formula (p-1)/(v*m) = 0.250" in result.stdout
    assert result.stdout.count("step breakdown, config") == 1


def test_train_with_nproc_runs_through_torchrun(launch_data_dir, tmp_path):
    result = clusterlm(
        "train",
        "--nproc",
        "2",
        "--data.dir",
        str(launch_data_dir),
        "--training.out_dir",
        str(tmp_path),
        "--training.steps",
        "6",
        "--parallel.data_parallel",
        "zero3",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: step 6") == 1  # reported once, by rank 0
    assert (tmp_path / "checkpoints" / "step_00000006" / "complete.json").is_file()


def _listeners(pids: set[int]) -> dict[str, str]:
    """The listening TCP sockets of ``pids``, by local address: ``ss -ltnp``'s line for each."""
    found = {}
    for line in subprocess.run(
        ["ss", "-Hltnp"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines():
        if pids & {int(pid) for pid in re.findall(r"pid=(\d+)", line)}:
            found[line.split()[3]] = line
    return found


def _on_loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return host not in ("*", "0.0.0.0", "::") and ipaddress.ip_address(host).is_loopback


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,nproc", [("ddp", 2), ("ps", 3)])
def test_a_single_node_job_listens_on_loopback_only(launch_data_dir, tmp_path, strategy, nproc):
    """While a default `train --nproc` job runs, every TCP socket that it (the launcher, torchrun's
    agent, every rank) listens on is on 127.0.0.1 or ::1: the rendezvous store, rank 0's store,
    gloo's pairs and, with a parameter server, each worker's connection to it."""
    if shutil.which("ss") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ss (iproute2) is missing under CI=true")
        pytest.skip("ss (iproute2) is missing; `make system-packages` installs it")
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clusterlm",
            "train",
            "--nproc",
            str(nproc),
            "--data.dir",
            str(launch_data_dir),
            "--training.out_dir",
            str(tmp_path),
            "--training.steps",
            "60",
            "--parallel.data_parallel",
            strategy,
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, owners = {}, set()
    try:
        while job.poll() is None:
            try:
                tree = psutil.Process(job.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            found = _listeners({job.pid, *(p.pid for p in tree)})
            seen.update(found)
            owners |= {
                int(pid) for line in found.values() for pid in re.findall(r"pid=(\d+)", line)
            }
            time.sleep(0.1)
        output = job.communicate(timeout=240)[0]
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    assert len(owners) >= nproc + 1, (
        seen
    )  # the agent's rendezvous store and every rank's own were seen
    assert [line for local, line in seen.items() if not _on_loopback(local)] == []


def test_plain_torchrun_module_launch_works_the_same(launch_data_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "clusterlm",
            "train",
            "--data.dir",
            str(launch_data_dir),
            "--training.out_dir",
            str(tmp_path),
            "--training.steps",
            "4",
            "--parallel.data_parallel",
            "ddp",
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: step 4") == 1


def test_a_failing_rank_ends_the_job_with_its_traceback():
    script = Path(__file__).with_name("fail_one_rank.py")
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stdout + result.stderr
    assert time.monotonic() - start < 90


def test_incomplete_launch_environment_is_one_line(launch_data_dir, tmp_path, monkeypatch):
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = str(tmp_path / "run")
    result = clusterlm(
        "train",
        "--data.dir",
        str(launch_data_dir),
        "--training.out_dir",
        out,
        *TINY,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "MASTER_ADDR" in result.stderr and "torchrun" in result.stderr


@pytest.mark.parametrize(
    "strategy,replicate,shard,world,expected",
    [
        ("ddp", 0, 0, 4, (4, 1)),
        ("zero1", 0, 0, 2, (2, 1)),
        ("zero2", 0, 0, 4, (1, 4)),
        ("zero3", 0, 0, 8, (1, 8)),
        ("hsdp", 2, 0, 8, (2, 4)),
        ("hsdp", 0, 2, 8, (4, 2)),
    ],
)
def test_mesh_degrees_are_derived(strategy, replicate, shard, world, expected):
    cfg = ParallelConfig(data_parallel=strategy, dp_replicate=replicate, dp_shard=shard)
    assert resolve_degrees(cfg, world) == expected


@pytest.mark.parametrize(
    "strategy,replicate,shard,world,message",
    [
        ("ddp", 3, 0, 4, "multiply to the world size"),
        ("zero3", 0, 3, 4, "multiply to the world size"),
        ("ddp", 0, 2, 4, "replicates only"),
        ("zero2", 2, 0, 4, "use hsdp"),
        ("hsdp", 0, 0, 4, "needs parallel.dp_replicate"),
    ],
)
def test_bad_degrees_fail_with_one_line(strategy, replicate, shard, world, message):
    with pytest.raises(UserError, match=message):
        resolve_degrees(
            ParallelConfig(data_parallel=strategy, dp_replicate=replicate, dp_shard=shard), world
        )


@pytest.mark.parametrize(
    "options,message",
    [
        (["--parallel.data_parallel", "hsdp"], "hsdp needs parallel.dp_replicate"),
        (
            ["--parallel.tp", "4", "--model.n_head", "2"],
            "parallel.tp (4) must divide model.n_head (2)",
        ),
        (["--parallel.pp", "4", "--parallel.data_parallel", "zero3"], "needs at least 4 layers"),
        (
            [
                "--parallel.pp",
                "2",
                "--parallel.data_parallel",
                "zero3",
                "--parallel.pp_microbatches",
                "3",
            ],
            "does not split into parallel.pp_microbatches (3)",
        ),
        (["--training.tokens_per_step", "100"], "must be a multiple of micro_batch_size"),
        (["--nnodes", "0:2"], "a job needs at least 1 node"),
        (
            [
                "--nnodes",
                "1:3",
                "--rdzv-endpoint",
                "127.0.0.1:29999",
                "--training.tokens_per_step",
                "384",
            ],
            "lets the group run on 8 processes",
        ),
    ],
)
def test_a_bad_layout_under_nproc_is_one_line_before_any_worker_starts(
    launch_data_dir, options, message
):
    start = time.monotonic()
    result = clusterlm(
        "train", "--nproc", "4", "--data.dir", str(launch_data_dir), *TINY, *options, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "torch.distributed.run" not in result.stderr  # refused before the launcher
    assert time.monotonic() - start < 30
