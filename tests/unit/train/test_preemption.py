"""Preemption: a grace period shorter than a step is one warning line; Ctrl-C stays an
interrupt whatever it breaks."""

import os
import signal

import pytest

from clusterlm.config import build_config
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.distributed.runtime import Runtime
from clusterlm.train import trainer
from clusterlm.train.preemption import Preemption


def test_a_grace_period_shorter_than_a_step_is_one_line(capsys):
    preemption = Preemption(grace_s=0.5)
    try:
        assert not preemption.requested(Runtime(device="cpu"), step_seconds=2.0)
        preemption.requested(Runtime(device="cpu"), step_seconds=2.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested(Runtime(device="cpu"), step_seconds=0.1)
    finally:
        preemption.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.preempt_grace_s" in err


@pytest.fixture
def ctrl_c():
    """SIGINT as an interactive Python has it (a background job starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_raises_at_once_and_is_recorded(ctrl_c):
    preemption = Preemption(grace_s=60)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert preemption.interrupted and preemption.signal_name is None
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        preemption = Preemption(grace_s=60)
        os.kill(os.getpid(), signal.SIGINT)
        preemption.close()
        assert not preemption.interrupted
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_interrupt_that_breaks_torch_is_still_the_interrupt(
    tmp_path, corpus_dir, monkeypatch, ctrl_c
):
    """Ctrl-C inside ``with torch.device("meta")`` can leave torch's mode stack half popped, so
    the ``with`` raises a RuntimeError; the trainer reports the interrupt, and leaves the
    out_dir as it found it."""
    data = tmp_path / "data"
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(data), workers=1))

    def broken_by_the_interrupt(cfg, preemption):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("trying to pop from empty mode stack") from None

    monkeypatch.setattr(trainer, "_train", broken_by_the_interrupt)
    out = tmp_path / "run"
    cfg = build_config(None, {"data.dir": str(data), "training.out_dir": str(out)})
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert not out.exists() or not any(out.rglob("*"))
