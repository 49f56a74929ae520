"""Which checkpoint a run resumes from: never what a failure left behind, and a restarted job's own
first."""

import json

import pytest

from clusterlm import checkpoint
from clusterlm.checkpoint.out_dir_lock import take, this_process
from clusterlm.errors import UserError


def _complete(root, step, run_id=None):
    tmp, final = checkpoint.begin_checkpoint(root, step)
    (tmp / "data.distcp").write_bytes(b"tensor bytes %d" % step)
    checkpoint.finish_checkpoint(
        tmp, final, {"step": step, "run_id": run_id}, keep_last=10, files=None
    )
    return final


def test_what_a_failure_leaves_behind_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    lock = take(tmp_path, this_process())  # the run's token names its temporaries
    good = _complete(root, 4)
    killed_in_write = (
        root / f".step_00000008.{lock.holder.token}.0123abcd.tmp"
    )  # a save killed while DCP wrote
    another_runs = root / ".step_00000008.ffffffffffffffffffffffffffffffff.0123abcd.tmp"
    another_runs.mkdir(parents=True)
    killed_in_write.mkdir()
    (killed_in_write / "__0_0.distcp").write_bytes(b"half")
    unfinished = root / "step_00000012"  # a directory that never got complete.json
    unfinished.mkdir()
    (unfinished / "trainer.json").write_text(json.dumps({"step": 12}))
    damaged = _complete(root, 16)
    (damaged / "data.distcp").write_bytes(b"bit rot")
    assert checkpoint.resolve_resume("auto", root).path == good
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.resolve_resume(str(damaged), root)
    _complete(root, 20)  # the next save clears what the killed one left, and only that
    lock.release()
    assert not killed_in_write.exists() and another_runs.is_dir()
    assert not (tmp_path / "run.lock").exists()


def test_a_restart_resumes_its_own_run_first(tmp_path):
    root = tmp_path / "checkpoints"
    mine = _complete(root, 3, run_id="job-a")
    _complete(root, 90, run_id="an-earlier-job")
    assert checkpoint.resolve_resume("none", root, own_run="job-a").path == mine
    assert (
        checkpoint.resolve_resume("none", root, own_run="job-b") is None
    )  # nothing of its own yet: as asked
    assert checkpoint.resolve_resume("auto", root).path.name == "step_00000090"
