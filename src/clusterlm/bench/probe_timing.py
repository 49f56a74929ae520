"""How the kernel probes time what they measure: on one thread, as each spawned process of a
local validation runs, and the best of a few rounds, since other load only adds time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block (a probe times one thread's rates), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def best_seconds(fn: Callable[[], object], calls: int = 5, rounds: int = 3) -> float:
    """Seconds per call, the best of ``rounds`` (other load only adds time)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best
