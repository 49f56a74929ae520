"""The launcher's agent: which worker failures end a job with one line
(``clusterlm.launch.agent``)."""

from __future__ import annotations

import json

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from clusterlm.launch.agent import reported_line
from clusterlm.launch.worker_errors import AGENT_VARIABLE, report_to_agent, user_error


def _reported(tmp_path, monkeypatch, rank: int, message: str) -> ProcessFailure:
    path = tmp_path / f"error_{rank}.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    assert report_to_agent(message)
    return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2, error_file=str(path))


def _crashed(tmp_path, rank: int, timestamp: int | None = None) -> ProcessFailure:
    """A worker that failed otherwise: with a recorded exception (and its time), or with none."""
    path = tmp_path / f"crash_{rank}.json"
    if timestamp is not None:
        path.write_text(
            json.dumps(
                {
                    "message": {
                        "message": "RuntimeError: boom",
                        "extraInfo": {"py_callstack": "", "timestamp": str(timestamp)},
                    }
                }
            )
        )
    return ProcessFailure(
        local_rank=rank, pid=100 + rank, exitcode=1 if timestamp else -15, error_file=str(path)
    )


def test_a_worker_prints_its_line_itself_unless_the_agent_started_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.delenv(AGENT_VARIABLE, raising=False)
    assert not report_to_agent("bad input")  # a plain torchrun's worker
    monkeypatch.setenv(AGENT_VARIABLE, "1")
    assert report_to_agent("bad input")
    data = json.loads((tmp_path / "error.json").read_text())
    assert user_error(data) == "bad input" and data["message"] == "UserError: bad input"
    assert user_error({"message": "RuntimeError: boom"}) is None


def test_the_lowest_reporting_rank_gives_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv(AGENT_VARIABLE, "1")
    failures = {
        1: _reported(tmp_path, monkeypatch, 1, "line of rank 1"),
        0: _reported(tmp_path, monkeypatch, 0, "line of rank 0"),
    }
    assert reported_line(ChildFailedError("train", failures)) == "line of rank 0"
    stopped = {0: _crashed(tmp_path, 0), 1: _reported(tmp_path, monkeypatch, 1, "line of rank 1")}
    assert (
        reported_line(ChildFailedError("train", stopped)) == "line of rank 1"
    )  # rank 0: stopped by torchrun


def test_a_failure_before_the_bad_input_keeps_torchruns_report(tmp_path, monkeypatch):
    monkeypatch.setenv(AGENT_VARIABLE, "1")
    reported = _reported(tmp_path, monkeypatch, 1, "line of rank 1")
    earlier = {0: _crashed(tmp_path, 0, timestamp=reported.timestamp - 5), 1: reported}
    assert reported_line(ChildFailedError("train", earlier)) is None
    assert reported_line(ChildFailedError("train", {0: _crashed(tmp_path, 0, timestamp=1)})) is None
