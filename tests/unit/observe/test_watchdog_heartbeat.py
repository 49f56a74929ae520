"""The hang watchdog is never silently off: a heartbeat it cannot write ends its thread with the
error recorded, and the rank's next phase raises it as one line, so training stops."""

from __future__ import annotations

import errno

import pytest

from clusterlm.config import build_config
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.errors import UserError
from clusterlm.observe import watchdog
from clusterlm.train.trainer import train


def failing_after(beats: int):
    """``atomic_write_json`` that writes ``beats`` heartbeats, then finds the disk full."""
    real, count = watchdog.atomic_write_json, [0]

    def write(path, payload, **kwargs):
        count[0] += 1
        if count[0] > beats:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, payload, **kwargs)

    return write


@pytest.mark.parametrize("beats", [0, 3])
def test_a_failed_heartbeat_is_raised_by_the_next_phase(tmp_path, monkeypatch, beats):
    monkeypatch.setattr(watchdog, "atomic_write_json", failing_after(beats))
    dog = watchdog.start(str(tmp_path), timeout_s=0.2)  # a beat every 0.05 s
    try:
        watchdog.phase("data", 0)
        dog.join(timeout=30)
        assert not dog.is_alive()  # the thread ended ...
        with pytest.raises(UserError) as caught:  # ... and said so
            watchdog.phase("forward_backward", 1)
        message = str(caught.value)
        assert (
            "\n" not in message
            and "cannot write its heartbeat" in message
            and "No space left" in message
        )
        assert "parallel.hang_timeout_s = 0" in message
    finally:
        watchdog.stop()  # does not raise: stopping is how every ending path leaves
    assert len(list((tmp_path / "heartbeat").glob("*.json"))) == (1 if beats else 0)


def test_training_fails_with_one_line(tmp_path, corpus_dir, monkeypatch):
    data = tmp_path / "data"
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(data), workers=1))
    monkeypatch.setattr(watchdog, "atomic_write_json", failing_after(0))
    cfg = build_config(
        None,
        {
            "data.dir": str(data),
            "training.out_dir": str(tmp_path / "run"),
            "training.steps": 10_000,
            "model.n_layer": 1,
            "model.n_head": 2,
            "model.n_embd": 16,
            "model.block_size": 8,
            "training.micro_batch_size": 2,
            "training.eval_interval": 0,
            "checkpoint.interval": 0,
            "metrics.progress": "none",
            "metrics.tensorboard": False,
            "metrics.plot": False,
            "metrics.peak_flops": 1e12,
            "training.precision": "fp32",
            "parallel.hang_timeout_s": 0.4,
        },
    )
    with pytest.raises(UserError, match=r"^the hang watchdog of rank 0 cannot write its heartbeat"):
        train(cfg)
