"""Per-rank step times and load balancing of uneven data-parallel ranks.

Ranks of a synchronous job all take the same wall time per step: a fast rank waits for the
slowest where gradients are reduced. A rank's *own* step time is what it would take alone: the
time between its step starts less the time it waited. ``RankClock`` measures that wait without
adding a collective to the step: the wait at the gradient reduction is the time from the rank's
last local gradient (a post-accumulate hook on every parameter) to the end of backward, when
DDP has the reduced gradients; collectives it runs itself (``wait``) count whole. FSDP's
collectives are inside the library, so under zero2/zero3 the own time includes its waiting.

``LoadBalancer`` turns each rank's forward/backward time, the part of a step that scales with
its micro-batches, into micro-batches per rank in proportion to each rank's speed, and hands
them to the loader at well-defined steps (every ``interval`` steps, after gathering the
window's medians). Every rank computes the same assignment from the same gathered figures, so
no decision has to be broadcast. On a CPU that time is the process's CPU time from its step
start to its reduced gradients, which neither waiting nor other processes on the machine
inflate, times the factor of ``training.slow_ranks``; on a GPU it is wall time after
synchronizing the device, less waiting (there the own step time is host-side, approximate).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clusterlm.errors import UserError


class RankClock:
    """This rank's own seconds per step and forward/backward seconds, measured at every step
    start of a whole (not pipelined) model ``part``."""

    def __init__(
        self, part: nn.Module, device: torch.device, on_step: Callable[[float], None] | None = None
    ):
        self.device = device
        self.on_step = on_step  # called with each step's forward/backward seconds
        self.own: list[float] = []  # own seconds per step, until taken
        self.waited_total = 0.0  # seconds spent waiting since the start, for training.slow_ranks
        self._arrived: float | None = None  # when this rank reached the previous step start
        self._waited = 0.0
        self._gradient_at: float | None = None
        self._compute = math.nan  # the last step's forward/backward seconds, waiting excluded
        self._compute_at_start = 0.0
        for param in part.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._gradient_ready)

    def _compute_clock(self) -> float:
        """The process's CPU seconds; on a GPU, wall seconds after the device finished, less
        the time waited so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter() - self.waited_total
        return time.process_time()

    def _gradient_ready(self, param: torch.Tensor) -> None:
        self._gradient_at = time.perf_counter()

    def _add_wait(self, seconds: float) -> None:
        self._waited += seconds
        self.waited_total += seconds

    def wait(self, collective: Callable[[], Any]) -> Any:
        """Run a collective; the time it takes counts as waiting for the other ranks."""
        start = time.perf_counter()
        result = collective()
        self._add_wait(time.perf_counter() - start)
        return result

    def stretch(self, factor: float) -> None:
        """The step's forward/backward was made ``factor`` times as long
        (``training.slow_ranks``)."""
        self._compute *= factor

    def gradients_reduced(self) -> None:
        """After the step's backward: from the last local gradient to now was waiting."""
        now = time.perf_counter()
        if self._gradient_at is not None:
            self._add_wait(max(now - self._gradient_at, 0.0))
        self._gradient_at = None
        self._compute = self._compute_clock() - self._compute_at_start

    def step_start(self) -> None:
        arrived, previous = time.perf_counter(), self._compute
        self._compute_at_start = self._compute_clock()
        if self._arrived is not None:
            self.own.append(arrived - self._arrived - self._waited)
        self._arrived, self._waited, self._compute = arrived, 0.0, math.nan
        if self.on_step is not None and not math.isnan(previous):
            self.on_step(previous)  # may gather (a collective): its wait belongs to this step

    def take_own(self) -> list[float]:
        own, self.own = self.own, []
        return own


def all_gather_floats(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length on every rank), in rank order."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def typical_seconds(own: list[float]) -> float:
    """The median of a rank's own step times: evaluation, checkpoint and logging steps, which
    hold collectives of their own, stand out and drop away."""
    return statistics.median(own) if own else math.nan


def balanced_counts(speeds: Sequence[float], total: int) -> list[int]:
    """``total`` micro-batches over ranks of ``speeds`` (micro-batches per second), at least one
    each, so that the slowest rank's time is least: each further micro-batch goes to the rank
    that would finish it first (ties to the lower rank)."""
    if total < len(speeds):
        raise ValueError(f"{total} micro-batches cannot give each of {len(speeds)} ranks one")
    rates = [max(s, 1e-12) for s in speeds]
    counts = [1] * len(rates)
    for _ in range(total - len(rates)):
        r = min(range(len(rates)), key=lambda r: ((counts[r] + 1) / rates[r], r))
        counts[r] += 1
    return counts


def parse_counts(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(
            f"parallel.load_balance_counts takes micro-batches per rank, e.g. '3,1'; got {text!r}"
        ) from None


class LoadBalancer:
    """Micro-batches per data-parallel rank, re-derived from measured speeds every ``interval``
    steps; a new assignment is taken only when it predicts a step at least 5% shorter, so that
    measurement noise does not move micro-batches back and forth."""

    def __init__(
        self,
        assign: Callable[[list[int]], None],
        counts: list[int],
        interval: int,
        fixed: bool,
        gather: Callable[[float], list[float]] | None = None,
    ):
        self.assign, self.interval, self.fixed, self.gather = (
            assign,
            max(interval, 1),
            fixed,
            gather,
        )
        self.counts: list[int] = []
        self._window: list[float] = []
        self.set_counts(counts)

    def set_counts(self, counts: list[int]) -> None:
        self.assign(counts)  # checks the counts
        self.counts = list(counts)

    def observe(self, seconds: float) -> None:
        """This rank's forward/backward time of a step; every ``interval`` steps the ranks'
        medians are gathered (the same call on every rank) and the assignment reconsidered."""
        if self.fixed:
            return
        self._window.append(seconds)
        if len(self._window) < self.interval:
            return
        mine, self._window = typical_seconds(self._window), []
        self.rebalance(self.gather(mine) if self.gather else [mine])

    def rebalance(self, seconds: list[float]) -> None:
        """Take the assignment that the ranks' step times ``seconds`` under the current one
        imply."""
        speeds = [n / max(t, 1e-9) for n, t in zip(self.counts, seconds, strict=True)]
        proposal = balanced_counts(speeds, sum(self.counts))

        def predicted(counts: list[int]) -> float:
            return max(n / v for n, v in zip(counts, speeds, strict=True))

        if proposal != self.counts and predicted(proposal) < 0.95 * predicted(self.counts):
            self.set_counts(proposal)


def attach_rank_timing(
    model: Any, loader: Any, cfg: Any, world_size: int, device: torch.device
) -> LoadBalancer | None:
    """Give a whole (not pipelined) model of a multi-process job a ``RankClock`` when stragglers
    are watched or the load balanced; returns the balancer, which starts from equal counts (or
    ``parallel.load_balance_counts``)."""
    p = cfg.parallel
    if (
        world_size == 1
        or model.pipeline is not None
        or not (p.load_balance or cfg.metrics.straggler_ratio)
    ):
        return None
    balancer = None
    if p.load_balance:
        if loader.grad_accum < 2:
            raise UserError(
                "parallel.load_balance moves micro-batches between ranks, so each needs several: "
                "raise training.tokens_per_step to at least 2 micro-batches per rank"
            )
        fixed = bool(p.load_balance_counts)
        counts = (
            parse_counts(p.load_balance_counts) if fixed else [loader.grad_accum] * loader.dp_size
        )
        balancer = LoadBalancer(loader.assign, counts, cfg.training.log_interval, fixed)
        model.balanced_micro_batches = loader.grad_accum
    model.clock = clock = RankClock(model.parts[0], device, balancer.observe if balancer else None)
    if balancer is not None:
        balancer.gather = lambda mine: [
            row[0] for row in clock.wait(lambda: all_gather_floats([mine], device))
        ]
    return balancer


def restore_counts(balancer: LoadBalancer | None, saved: list[int] | None) -> None:
    """A resumed run continues with the saved assignment when it fits the job (same ranks and
    micro-batches) and none is fixed by the config; otherwise it measures afresh."""
    if balancer is None or balancer.fixed or not saved:
        return
    if len(saved) == len(balancer.counts) and sum(saved) == sum(balancer.counts):
        balancer.set_counts(list(saved))
