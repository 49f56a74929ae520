"""The launcher's part in preemption: pass SIGTERM and SIGUSR1 on to torchrun, which passes them
to every worker (SIGUSR1 only when told to: ``PET_SIGNALS_TO_HANDLE``), and give the workers the
whole grace period to save before it kills them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``)."""

from __future__ import annotations

import math
import signal
import subprocess
from typing import Any

from clusterlm.train.preemption import EXIT_PREEMPTED, SIGNALS


def preemption_environment(env: dict[str, str], grace_s: float) -> dict[str, str]:
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(grace_s) + 5))
    return env


def run_forwarding_preemption(command: list[str], env: dict[str, str]) -> int:
    """Run the launcher; a preemption signal to this process goes to it, and the job's status is
    then ``EXIT_PREEMPTED`` (torchrun itself reports a signal as a failure)."""
    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_PREEMPTED if received else status
