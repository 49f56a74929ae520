"""Preemption: SIGTERM or SIGUSR1 (what Slurm sends before a time limit) ends training cleanly.

The signal handler only sets a flag. At the next step boundary every rank takes the maximum of
the flags over the group (one tiny all-reduce per step), so all ranks stop at the same step, save
one complete checkpoint, finish any save still writing, and leave with ``EXIT_PREEMPTED``. The
next start with ``--resume auto`` continues bit for bit. All of it has to fit in
``checkpoint.preempt_grace_s``, the time between the signal and the scheduler's kill: a step
that alone takes longer is reported once.

Ctrl-C (SIGINT) still raises ``KeyboardInterrupt`` at once, but is also recorded: an interrupt
that lands inside torch's own bookkeeping (a device context, a mode stack) can surface as some
other error, and the trainer must still report it as the interrupt it was.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from clusterlm.distributed.runtime import Runtime

# sysexits' EX_TEMPFAIL: stopped on request with a checkpoint saved; run again to continue.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, grace_s: float, announce: bool = True):
        self.grace_s = grace_s
        self.announce = announce
        self.signal_name: str | None = None
        self.signalled_at: float | None = None
        self._warned = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}
        if (
            threading.current_thread() is threading.main_thread()
        ):  # Python allows handlers only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name, self.signalled_at = signal.Signals(signum).name, time.monotonic()

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def requested(self, runtime: Runtime, step_seconds: float) -> bool:
        """Whether any rank was signalled; every rank calls this at the same step boundary."""
        if step_seconds > self.grace_s and not self._warned and self.announce:
            self._warned = True
            print(
                f"warning: one step took {step_seconds:.1f} s, "
                f"longer than checkpoint.preempt_grace_s ({self.grace_s:g} s): "
                "a preempted job may be killed before it saves; raise "
                "checkpoint.preempt_grace_s (and the scheduler's grace period) above the step time",
                file=sys.stderr,
                flush=True,
            )
        flag = 1 if self.signal_name else 0
        if runtime.world_size > 1 and runtime.lockstep:  # a parameter server's ranks share no group
            box = torch.tensor([flag], device=runtime.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX)
            flag = int(box.item())
        return bool(flag)

    def report(self, step: int, saved: str) -> str:
        waited = (
            f" {time.monotonic() - self.signalled_at:.1f} s after {self.signal_name}"
            if self.signalled_at
            else ""
        )
        return (
            f"preempted at step {step}: saved {saved}{waited}; "
            f"exiting with status {EXIT_PREEMPTED}, continue with --resume auto"
        )

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
