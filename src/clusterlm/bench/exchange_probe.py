"""What a ring exchange and an all-to-all cost beyond their bytes when the processes share the
cores: the wait of each rank for its peers to reach the exchange.

Ring attention posts a send to the next rank and a receive from the previous one
(``batch_isend_irecv``) before computing with the block it holds and waits on both after it (a K/V
hop); in backward it also sends the accumulated gradients on one hop and waits at once (a gradient
hop), right after the K/V hop's wait on every step but the last. All-to-all attention and expert
parallelism exchange with every peer of their group after a block of work (``all_to_all_single``).
Where every process has a core, the wait is the link's latency. Where processes outnumber cores, a
rank that arrives waits until its peers are scheduled and arrive too, once per exchange; a hop
posted before the work hides part of that behind it, and a hop right after another's wait finds its
neighbours just met: this is what ``plan --validate``'s cp and ep cases measured and the all-reduce
sweep's latency (``measure_link``) does not see. The probe times rounds of each pattern, a block of
single-threaded work with an exchange of a small message among all the processes, against the same
work alone, on as many processes as the case has; the difference per round is the exchange's wait.
Among all of them, even where a case exchanges within smaller groups: pairs probed alone among four
processes waited about twice as long as the hops of cp2 x zero3 on four processes, whose FSDP
collectives keep all four in step
(benchmarks/planner-validation-idle-cpu-epyc-zen5-2026-12-07.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from clusterlm.distributed.local_spawn import run_local
from clusterlm.plan.cluster import ExchangeWaits

WORK_SIDE = 192  # a square fp32 matmul of a few hundred microseconds on one thread
WORK_MATMULS = 4  # per block of work between exchanges
MESSAGE_ELEMENTS = 1024


class _Ring:
    """This rank's neighbours among all the processes, and what it computes and sends."""

    def __init__(self) -> None:
        rank, size = dist.get_rank(), dist.get_world_size()
        self.next, self.previous = (rank + 1) % size, (rank - 1) % size
        self.a = torch.randn(WORK_SIDE, WORK_SIDE)
        self.buffer, self.received = torch.zeros(MESSAGE_ELEMENTS), torch.empty(MESSAGE_ELEMENTS)

    def work(self) -> None:
        for _ in range(WORK_MATMULS):
            torch.mm(self.a, self.a)

    def hop(self) -> None:
        """Post a hop and wait for it."""
        for request in self.post_hop():
            request.wait()

    def post_hop(self) -> list:
        ops = [
            dist.P2POp(dist.isend, self.buffer, self.next),
            dist.P2POp(dist.irecv, self.received, self.previous),
        ]
        return dist.batch_isend_irecv(ops)


def _alone(g: _Ring) -> None:
    g.work()


def _posted(g: _Ring) -> None:
    requests = g.post_hop()
    g.work()
    for request in requests:
        request.wait()


def _after(g: _Ring) -> None:
    g.work()
    g.hop()


def _after_then_hop(g: _Ring) -> None:
    _after(g)
    g.hop()


def _all_to_all(g: _Ring) -> None:
    g.work()
    dist.all_to_all_single(g.received, g.buffer)


PATTERNS: dict[str, Callable[[_Ring], None]] = {
    "posted": _posted,
    "after": _after,
    "all_to_all": _all_to_all,
    "after_then_hop": _after_then_hop,
}


def _seconds_per_pattern(g: _Ring, rounds: int, warmup: int) -> dict[str, float]:
    """Mean seconds of each pattern (the work alone as ``"alone"``) on this rank over ``rounds``
    rounds after ``warmup``, all ranks starting together. Every round runs every pattern once, so
    whatever state the machine drifts through (its cores' idle states, the scheduler's queues)
    weighs on all of them alike (timed one pattern after the other, its readings changed from one
    invocation to the next and overstated what a ring paid in training:
    benchmarks/planner-exchange-probe-interleaved-cpu-xeon-2026-12-07.md).
    The mean, not the median: a step pays every exchange's wait, the rare long ones included."""
    patterns = {"alone": _alone, **PATTERNS}
    times: dict[str, list[float]] = {name: [] for name in patterns}
    dist.barrier()
    for _ in range(warmup + rounds):
        for name, pattern in patterns.items():
            start = time.perf_counter()
            pattern(g)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.fmean(t[warmup:]) for name, t in times.items()}


def _probe_rank(rank: int, world_size: int, rounds: int) -> dict[str, float]:
    torch.set_num_threads(1)
    seconds = _seconds_per_pattern(_Ring(), rounds, warmup=rounds // 4)
    return {name: seconds[name] - seconds["alone"] for name in PATTERNS}


def measure_exchange_waits(nproc: int, rounds: int = 1000) -> ExchangeWaits:
    """The waits of a ring hop posted before a block of work, one posted after it, and an
    all-to-all, on ``nproc`` local gloo processes of one thread each: per pattern the mean over
    the ranks and rounds, 0 where it adds nothing measurable."""
    if nproc < 2:
        raise ValueError(f"measure_exchange_waits needs at least 2 processes, got {nproc}")
    waits = run_local(_probe_rank, nproc, rounds, timeout=240)
    mean = {name: statistics.fmean(w[name] for w in waits) for name in PATTERNS}
    return ExchangeWaits(
        posted=max(0.0, mean["posted"]),
        after=max(0.0, mean["after"]),
        all_to_all=max(0.0, mean["all_to_all"]),
        chained=max(0.0, mean["after_then_hop"] - mean["after"]),
    )
