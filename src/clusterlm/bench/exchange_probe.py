"""What a ring exchange and an all-to-all cost beyond their bytes when the processes share the
cores: the wait of each rank for its peers to reach the exchange.

Ring attention posts a send to the next rank and a receive from the previous one
(``batch_isend_irecv``) after each block of work, and waits on both; all-to-all attention and
expert parallelism exchange with every peer (``all_to_all_single``). Where every process has a
core, the wait is the link's latency. Where processes outnumber cores, a rank that arrives waits
until its neighbour is scheduled and arrives too, once per exchange: this is what ``plan
--validate``'s ring cases measured and the all-reduce sweep's latency (``measure_link``) does not
see. The probe times rounds of the same pattern, a block of single-threaded work then an exchange
of a small message, against the same work without exchanges, on the same number of processes;
the difference per round is the exchange's wait.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from clusterlm.distributed.local_spawn import run_local

WORK_SIDE = 192  # a square fp32 matmul of a few hundred microseconds on one thread
WORK_MATMULS = 4  # per block of work between exchanges
MESSAGE_ELEMENTS = 1024


def _block_of_work(a: torch.Tensor) -> None:
    for _ in range(WORK_MATMULS):
        torch.mm(a, a)


def _ring_exchange(buffer: torch.Tensor, received: torch.Tensor) -> None:
    rank, size = dist.get_rank(), dist.get_world_size()
    ops = [
        dist.P2POp(dist.isend, buffer, (rank + 1) % size),
        dist.P2POp(dist.irecv, received, (rank - 1) % size),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def _all_to_all(buffer: torch.Tensor, received: torch.Tensor) -> None:
    dist.all_to_all_single(received, buffer)


PATTERNS = {"ring": _ring_exchange, "all_to_all": _all_to_all}


def _seconds_per_round(rounds: int, pattern: str | None, elements: int) -> float:
    """Mean over ``rounds`` of one round's seconds on this rank, all ranks starting together: a
    block of work, then the exchange of ``pattern`` (none: the work alone). The mean, not the
    median: a step pays every exchange's wait, the rare long ones included."""
    a = torch.randn(WORK_SIDE, WORK_SIDE)
    buffer, received = torch.zeros(elements), torch.empty(elements)
    dist.barrier()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        _block_of_work(a)
        if pattern is not None:
            PATTERNS[pattern](buffer, received)
        times.append(time.perf_counter() - start)
    return statistics.fmean(times)


def _probe_rank(rank: int, world_size: int, rounds: int, elements: int) -> dict[str, float]:
    torch.set_num_threads(1)
    for pattern in PATTERNS:  # warm-up: connections, caches
        _seconds_per_round(rounds // 4, pattern, elements)
    working = _seconds_per_round(rounds, None, elements)
    return {p: _seconds_per_round(rounds, p, elements) - working for p in PATTERNS}


def measure_exchange_waits(
    nproc: int, rounds: int = 400, elements: int = MESSAGE_ELEMENTS
) -> dict[str, float]:
    """Seconds a ring exchange and an all-to-all (of a small message) each add to a block of work
    on ``nproc`` local gloo processes of one thread each, ``elements`` fp32 values a message: per
    pattern the mean over the ranks and rounds, 0 where it adds nothing measurable."""
    if nproc < 2:
        raise ValueError(f"measure_exchange_waits needs at least 2 processes, got {nproc}")
    waits = run_local(_probe_rank, nproc, rounds, elements, timeout=180)
    return {pattern: max(0.0, statistics.fmean(w[pattern] for w in waits)) for pattern in PATTERNS}
