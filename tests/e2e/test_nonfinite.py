"""A non-finite loss or gradient stops the run with one line, or is skipped when asked; a
checkpoint of non-finite weights is never written."""

import json
import math

import pytest
import torch
from train_helpers import records, train_cli

from clusterlm import checkpoint
from clusterlm.checkpoint import CheckpointWriter
from clusterlm.errors import UserError
from clusterlm.parallel.model import WholeModel
from clusterlm.parallel.precision import Precision


def _train(data_dir, out, *extra):
    return train_cli(data_dir, out, 6, *extra)


def _poison(monkeypatch, losses=(), grads=()):
    """Make the loss (steps in ``losses``) or every gradient (steps in ``grads``) NaN."""
    original, calls = WholeModel.forward_backward, []

    def forward_backward(self, micro_batches):
        loss = original(self, micro_batches)
        calls.append(None)
        step = len(calls)
        if step in grads:
            for param in self.parts[0].parameters():
                param.grad.fill_(math.nan)
        return loss * math.nan if step in losses else loss

    monkeypatch.setattr(WholeModel, "forward_backward", forward_backward)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _newest(out):
    return checkpoint.resolve_resume("auto", out / "checkpoints")


@pytest.mark.parametrize(
    "poison,found", [({"losses": (3,)}, "loss nan"), ({"grads": (3,)}, "gradient norm nan")]
)
def test_a_nonfinite_step_stops_the_run_with_one_line(
    poison, found, data_dir, tmp_path, monkeypatch, capsys
):
    _poison(monkeypatch, **poison)
    assert _train(data_dir, tmp_path) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1, errors
    assert (
        errors[0].startswith(f"error: training stopped at step 3: {found}")
        and "--resume auto" not in errors[0]
    )
    assert [p.name for p in checkpoint.list_complete(tmp_path / "checkpoints")] == ["step_00000002"]
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text()) == {
        "checkpoint": "step_00000002"
    }
    assert not list((tmp_path / "checkpoints").glob(".step_*"))
    assert _newest(tmp_path).state["step"] == 2


def test_a_runaway_learning_rate_stops_before_anything_nonfinite_is_saved(
    data_dir, tmp_path, capsys
):
    assert (
        _train(
            data_dir,
            tmp_path,
            "--optim.lr",
            "1e30",
            "--optim.warmup_steps",
            "0",
            "--checkpoint.interval",
            "1",
        )
        == 2
    )
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: training stopped at step "), errors
    stopped = int(errors[0].split("step ")[1].split(":")[0])
    saved = checkpoint.list_complete(tmp_path / "checkpoints")
    assert [p.name for p in saved] == [
        f"step_{step:08d}" for step in range(max(1, stopped - 2), stopped)
    ]
    for path in saved:  # every checkpoint that exists holds finite weights
        reader = checkpoint.CheckpointReader(path)
        for name in reader.model_shapes():
            assert torch.isfinite(reader.model_tensor(name)).all(), (path, name)


def test_skipped_steps_are_not_applied_and_are_counted(data_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, losses=(3,), grads=(4,))
    original, applied = Precision.step, []
    monkeypatch.setattr(
        Precision, "step", lambda self, optimizers: (applied.append(1), original(self, optimizers))
    )
    assert _train(data_dir, tmp_path, "--training.skip_nonfinite", "true") == 0
    assert len(applied) == 4  # 6 steps, 2 skipped: the optimizer never saw them
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [
        1,
        2,
        4,
        5,
        6,
    ]  # a NaN loss is not logged; step 4's loss was finite
    assert [r["skipped_steps"] for r in train] == [0, 0, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert _newest(tmp_path).state["step"] == 6


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tmp_path):
    root = tmp_path / "checkpoints"
    good = {"model": {"w": torch.ones(3)}, "optim": {"w": {"exp_avg": torch.zeros(3)}}}
    CheckpointWriter().save(root, 2, good, {"step": 2}, keep_last=2)
    bad = {
        "model": {"w": torch.tensor([1.0, math.inf, 0.0])},
        "optim": {"w": {"exp_avg": torch.zeros(3)}},
    }
    for background in (False, True):
        writer = CheckpointWriter(background=background)
        with pytest.raises(
            UserError,
            match="step 4: model.w holds NaN or infinite values; the checkpoint was not saved",
        ) as err:
            writer.save(root, 4, bad, {"step": 4}, keep_last=2)
        writer.close()
        assert "\n" not in str(err.value) and "--resume auto" not in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert json.loads((root / "latest").read_text()) == {"checkpoint": "step_00000002"}
