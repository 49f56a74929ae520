"""`clusterlm average`: the mean of a run's last checkpoints, from any layout, read like any
run's checkpoint, never resumed from; bad input gets one line and writes nothing."""

import json

import pytest
import torch
from launch_helpers import TINY, clusterlm
from train_helpers import train_cli

from clusterlm.checkpoint import CheckpointReader, list_complete
from clusterlm.cli import main as cli


def _assert_mean_of(averaged: CheckpointReader, sources: list[CheckpointReader]) -> None:
    assert averaged.model_shapes() == sources[0].model_shapes()
    for name in averaged.model_shapes():
        mean = torch.stack([s.model_tensor(name).double() for s in sources]).mean(0)
        torch.testing.assert_close(averaged.model_tensor(name), mean.float(), rtol=0, atol=1e-7)


def test_an_average_is_the_mean_of_the_last_checkpoints(data_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "avg"
    assert train_cli(data_dir, run, 8, "--checkpoint.keep_last=4") == 0
    sources = list_complete(run / "checkpoints")[-3:]  # steps 4, 6 and 8
    assert cli(["average", "--run", str(run), "--last", "3", "--out", str(out)]) == 0
    (written,) = list_complete(out / "checkpoints")
    assert written.name == "step_00000008"
    _assert_mean_of(CheckpointReader(written), [CheckpointReader(p) for p in sources])
    state = json.loads((written / "trainer.json").read_text())
    assert state["averaged_from"] == [str(p) for p in sources]
    tokenizer = (sources[-1] / "tokenizer.json").read_bytes()
    assert (written / "tokenizer.json").read_bytes() == tokenizer
    assert cli(["eval", "--run", str(out)]) == 0
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    assert train_cli(data_dir, resumed, 10, "--checkpoint.resume", str(written)) != 0
    err = capsys.readouterr().err
    assert "holds no optimizer state" in err and len(err.strip().splitlines()) == 1
    assert not resumed.exists()


def test_an_average_reads_checkpoints_sharded_over_processes(launch_data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    trained = clusterlm(
        *("train", "--nproc", "2", "--data.dir", str(launch_data_dir), *TINY),
        *("--training.out_dir", str(run), "--training.steps", "4", "--checkpoint.interval", "2"),
        *("--parallel.data_parallel", "zero3"),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert cli(["average", "--run", str(run), "--last", "2", "--out", str(out)]) == 0
    sources = [CheckpointReader(p) for p in list_complete(run / "checkpoints")]
    _assert_mean_of(CheckpointReader(list_complete(out / "checkpoints")[0]), sources)


@pytest.mark.parametrize(
    ("last", "out_holds", "message"),
    [
        ("1", None, "at least 2"),
        ("5", None, "holds 4 complete checkpoints, fewer than --last 5"),
        ("2", "notes.txt", "exists and is not empty"),
    ],
    ids=["one", "more-than-kept", "out-not-empty"],
)
def test_average_refuses_bad_input_in_one_line(
    data_dir, tmp_path, capsys, last, out_holds, message
):
    run, out = tmp_path / "run", tmp_path / "avg"
    assert train_cli(data_dir, run, 8, "--checkpoint.keep_last=4") == 0
    if out_holds:
        out.mkdir()
        (out / out_holds).write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert cli(["average", "--run", str(run), "--last", last, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
