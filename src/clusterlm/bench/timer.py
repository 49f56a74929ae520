"""Time the trainer's own training steps."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from clusterlm.train.session import Session
from clusterlm.train.trainer import train_step


def time_steps(session: Session, steps: int, slowest_rank: bool = False) -> list[float]:
    """Run ``steps`` training steps and return each one's seconds; reading the loss with ``.item()``
    waits for the device, so a step's time includes its kernels. With ``slowest_rank`` the ranks
    start together (a barrier) and every rank gets, per step, the slowest rank's time (a process
    without a process group is its own slowest rank)."""
    grouped = slowest_rank and dist.is_initialized()
    if grouped:
        dist.barrier()
    seconds = torch.empty(steps, dtype=torch.float64)
    for i in range(steps):
        start = time.perf_counter()
        train_step(session).item()
        seconds[i] = time.perf_counter() - start
    if grouped:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.tolist()
