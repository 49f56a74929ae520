"""Preemption: a grace period shorter than a step is one warning line."""

import os
import signal

from clusterlm.distributed.runtime import Runtime
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
