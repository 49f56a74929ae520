"""One run per out_dir: a live run's out_dir is refused, a dead run's lock is taken over, a fresh
run does not start over another run's checkpoints, and a save never touches another run's files."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
from train_helpers import TINY_ARGS, train_cli

from clusterlm.checkpoint.out_dir_lock import LOCK, take, this_process
from clusterlm.cli import main as cli
from clusterlm.errors import UserError
from clusterlm.files import exclusive_write_json


def _train(data_dir, out, *extra):
    return train_cli(data_dir, out, 4, *extra)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock_of(pid: int, **fields) -> dict:
    """A lock as a run of process ``pid`` on this host would have written it."""
    return {**asdict(replace(this_process(), pid=pid, pid_start=None)), **fields}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_a_live_run_holds_its_out_dir_and_a_second_run_is_refused_naming_it(
    data_dir, tmp_path, capsys
):
    out, log = tmp_path / "run", tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clusterlm",
                "train",
                "--data.dir",
                str(data_dir),
                "--training.out_dir",
                str(out),
                "--training.steps",
                "100000",
                "--checkpoint.interval",
                "0",
                *TINY_ARGS,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        lock = out / LOCK
        deadline = time.monotonic() + 120
        while not lock.is_file():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        assert _train(data_dir, out) == 2
        line = _one_error_line(capsys)
        assert (
            f"is in use by another run (pid {first.pid} on {socket.gethostname()}, "
            f"started {holder['started']})" in line
        )
        assert (
            cli(
                [
                    "train",
                    "--nproc",
                    "2",
                    "--data.dir",
                    str(data_dir),
                    "--training.out_dir",
                    str(out),
                    *TINY_ARGS,
                ]
            )
            == 2
        )
        assert f"pid {first.pid}" in _one_error_line(
            capsys
        )  # the launcher refuses before any rank starts
        assert json.loads(lock.read_text()) == holder
    finally:
        first.send_signal(signal.SIGTERM)  # saves at the next step and exits 75
        status = first.wait(timeout=120)
    assert status == 75, log.read_text()[-2000:]
    assert not (out / LOCK).exists()  # released on exit


def test_a_dead_runs_lock_is_taken_over_with_a_warning_and_only_its_temporaries_go(
    data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    stale = _lock_of(_dead_pid())
    assert exclusive_write_json(out / LOCK, stale)
    checkpoints = out / "checkpoints"
    its_unfinished_save = checkpoints / f".step_00000006.{stale['token']}.{'1' * 32}.tmp"
    another_runs = checkpoints / f".step_00000006.{'f' * 32}.{'2' * 32}.tmp"
    for path in (its_unfinished_save, another_runs):
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_bytes(b"half")
    assert _train(data_dir, out) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: taking over {out / LOCK} from a run that is gone (pid {stale['pid']} on " in err
    )
    assert not its_unfinished_save.exists()
    assert (another_runs / "__0_0.distcp").read_bytes() == b"half"  # never touched
    assert (checkpoints / "step_00000004" / "complete.json").is_file()
    assert not (out / LOCK).exists()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    """The pid is alive (this test's own), but the process that wrote the lock started earlier."""
    me = this_process()
    assert exclusive_write_json(
        tmp_path / LOCK, {**asdict(me), "pid_start": (me.pid_start or 0) - 1}
    )
    lock = take(tmp_path, this_process())
    assert lock.replaced.pid == os.getpid()
    lock.release()


def test_a_holder_on_another_host_is_refused_with_the_way_out(tmp_path):
    assert exclusive_write_json(tmp_path / LOCK, _lock_of(4242, host="node-7"))
    with pytest.raises(
        UserError,
        match=f"pid 4242 on node-7, started .*; if that run is gone, delete {tmp_path / LOCK}",
    ):
        take(tmp_path, this_process())


def test_a_restarted_job_takes_over_its_earlier_attempt_and_keeps_its_token(tmp_path):
    """Rank 0 of attempt 0 ran on another node; attempt 1's rank 0 continues the same run."""
    earlier = _lock_of(4242, host="node-7", job="job-17", attempt=[0, 0])
    assert exclusive_write_json(tmp_path / LOCK, earlier)
    lock = take(tmp_path, this_process(job="job-17", attempt=(0, 1)))
    assert lock.holder.token == earlier["token"] and lock.replaced is None
    lock.release()
    assert exclusive_write_json(tmp_path / LOCK, earlier)
    with pytest.raises(UserError, match="in use by another run"):  # another job
        take(tmp_path, this_process(job="job-18", attempt=(0, 1)))
    with pytest.raises(
        UserError, match="in use by another run"
    ):  # a job sharing the id, at the same attempt
        take(tmp_path, this_process(job="job-17", attempt=(0, 0)))


def test_a_fresh_run_into_checkpoints_is_refused_unless_it_resumes_or_overwrites(
    data_dir, tmp_path, capsys, tree
):
    out = tmp_path / "run"
    assert _train(data_dir, out) == 0
    capsys.readouterr()
    before = tree(out)
    assert _train(data_dir, out) == 2
    line = _one_error_line(capsys)
    assert "holds checkpoints of an earlier run (newest: step_00000004)" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert tree(out) == before  # refused before anything was written
    assert _train(data_dir, out, "--training.steps", "6", "--resume", "auto") == 0
    assert (out / "checkpoints" / "step_00000006" / "complete.json").is_file()
    for flag in (["--overwrite"], ["--checkpoint.overwrite", "true"]):
        assert _train(data_dir, out, "--training.steps", "2", *flag) == 0
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
        assert json.loads((out / "checkpoints" / "latest").read_text()) == {
            "checkpoint": "step_00000002"
        }
    assert not (out / LOCK).exists()
