"""The shared multi-process helper reports failures and hangs instead of blocking."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch.distributed as dist

from .helpers import run_distributed


def _rank_and_world(rank: int, world_size: int) -> tuple[int, int, int, str]:
    return rank, dist.get_rank(), dist.get_world_size(), os.environ["MARKER"]


def _surroundings(rank: int, world_size: int) -> tuple[str, str, bool]:
    import sys

    return os.getcwd(), os.environ.get("LATE_MARKER", ""), "clusterlm.train.trainer" in sys.modules


@dataclasses.dataclass
class Reading:
    rank: int
    seconds: float


class Trap:
    """Unpickling it would run a shell command that leaves a file behind."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reading(rank: int, world_size: int) -> Reading:
    return Reading(rank, 0.5)


def _trap(rank: int, world_size: int, marker: str) -> Trap:
    return Trap(marker)


def _fail_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes


def _hang(rank: int, world_size: int) -> int:
    # The pid file lets the test check the process is gone afterwards.
    with open(os.path.join(os.environ["PID_DIR"], str(rank)), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    return rank


def test_returns_every_rank_result_with_group_and_env_set():
    assert run_distributed(_rank_and_world, 2, env={"MARKER": "x"}) == [(0, 0, 2, "x"), (1, 1, 2, "x")]


def test_workers_see_the_callers_environment_and_directory_as_they_are_now(tmp_path, monkeypatch):
    """Workers fork from a server started at the first call (with the trainer imported): what
    the caller changed since then reaches them all the same."""
    run_distributed(_rank_and_world, 1, env={"MARKER": "x"})  # the server is running
    monkeypatch.setenv("LATE_MARKER", "set later")
    monkeypatch.chdir(tmp_path)
    assert run_distributed(_surroundings, 2) == [(str(tmp_path), "set later", True)] * 2


def test_exception_on_one_rank_is_reported_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_distributed(_fail_on_rank_1, 2, timeout=60)
    message = str(failure.value)
    assert "rank 1 failed" in message and "Traceback" in message
    assert "deliberate failure on rank 1" in message and "_fail_on_rank_1" in message
    assert time.monotonic() - start < 30  # rank 0 is killed, not waited for


def test_hang_times_out_quickly_and_leaves_no_process(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 10s, ranks still running: \[0, 1\]"):
        run_distributed(_hang, 2, timeout=10, env={"PID_DIR": str(tmp_path)})
    assert time.monotonic() - start < 25
    pid_files = list(tmp_path.iterdir())
    assert len(pid_files) == 2
    for pid_file in pid_files:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_results_load_without_running_code_and_only_the_allowed_classes(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(AssertionError, match="returned posix.system, which is not in run_local's result_types"):
        run_distributed(_trap, 2, str(marker))
    assert not marker.exists()
    with pytest.raises(AssertionError, match=r"returned \S*test_helpers.Reading, which is not"):
        run_distributed(_reading, 1)
    assert run_distributed(_reading, 2, result_types=[Reading]) == [Reading(0, 0.5), Reading(1, 0.5)]
