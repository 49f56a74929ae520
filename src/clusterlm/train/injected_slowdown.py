"""Uneven nodes on demand: chosen ranks made slower by a factor, for experiments and tests.

``training.slow_ranks = "1:3"`` makes rank 1 take three times as long for its share of every
step: after the timed work (forward and backward of its micro-batches) it sleeps twice what the
work took. The sleep scales with the work, so a rank given fewer micro-batches (load balancing)
or a worker that computes fewer gradients (asynchronous training) is slowed in proportion, as a
slower machine would be. The numerics are untouched. With a ``RankClock``
(``clusterlm.parallel.load_balance``), time the rank spent waiting for other ranks is not work
and is not stretched, and the clock is told the rank's compute was stretched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def slowed(factor: float, clock: Any = None) -> Iterator[None]:
    """Run the block, then sleep ``factor - 1`` times what it took, less the time it waited."""
    start, waited = time.perf_counter(), getattr(clock, "waited_total", 0.0)
    yield
    if factor > 1:
        work = time.perf_counter() - start - (getattr(clock, "waited_total", 0.0) - waited)
        time.sleep((factor - 1) * max(work, 0.0))
        if clock is not None:
            clock.stretch(factor)
