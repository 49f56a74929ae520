"""A parameter server: one shard of the parameters (whole tensors) with their optimizer state,
updated by the gradients workers push, under a staleness bound.

Each worker talks to each server over its own two-rank gloo group, made through the job's
TCPStore when the worker joins: a worker that dies breaks only its own groups (the server's
receive fails at once and the worker is counted lost), and a restarted worker joins again with
new ones. One thread per worker receives its pushes; updates are applied under one lock. What
travels over a pair group is ``clusterlm.parallel.ps_wire``'s protocol.

Clocks and staleness (Ho et al., "More effective distributed ML via a stale synchronous
parallel parameter server", 2013): a worker's clock is the number of gradients it pushed. Before
answering a push of clock c with fresh parameters, the server waits until every live worker has
reached clock c + 1 - s (``parallel.ps_staleness = s``; -1 never waits). The staleness of a push
is its clock minus the slowest live worker's clock when the worker read the parameters it
computed on: the rounds of updates its gradient may have missed, at most s under SSP. With
s = 0 the server sums a round's gradients and applies their mean once every live worker pushed
(bulk-synchronous), so that with the same global batch a run equals synchronous data parallel.

Peers and pushes (``clusterlm.distributed.signing``): a join must be signed with the job's
secret and the worker must answer the server's challenge before the server sends or applies
anything; a peer that fails either is refused. A push whose gradients are not finite or not the
shard's size, or whose learning rate is not finite or is negative, is rejected: it counts
against the budget like any push but changes nothing. Each refusal and rejection names the
worker on stderr and is counted in the metrics every reply carries (``ps_refused_peers``,
``ps_rejected_pushes``).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from clusterlm.distributed.signing import SignedStore, UnsignedValue, challenge
from clusterlm.parallel.ps_wire import (
    HEADER,
    PUSH,
    SNAPSHOT,
    flatten,
    message,
    pair_group,
    unflatten_into,
)
from clusterlm.parallel.state_dict import create_missing_state


class Unreadable(Exception):
    """A push the server does not read: empty, larger than the shard, or of no whole size."""


@dataclass
class Stats:
    pushes: int = 0  # gradients applied (or summed into a round)
    staleness_sum: int = 0
    staleness_max: int = 0
    # Time spent applying the optimizer: what bounds the pushes a server can take.
    busy_s: float = 0.0
    rejected: int = 0  # pushes refused: non-finite or wrongly sized gradients, a bad learning rate
    refused: int = 0  # peers refused: an unsigned join, a failed challenge


@dataclass
class Clocks:
    """Every live worker's clock, and the slowest clock each saw when it last read parameters."""

    live: dict[int, int] = field(default_factory=dict)
    read_at: dict[int, int] = field(default_factory=dict)
    connection: dict[int, int] = field(default_factory=dict)  # the join number serving each worker

    @property
    def slowest(self) -> int:
        return min(self.live.values(), default=0)


class ParameterServer:
    """Serves ``params`` (this server's shard) with ``optimizer`` (which may also hold other
    parameters: only those with a gradient are stepped) until the job's budget of ``total_steps``
    global batches of ``workers`` pushes is spent and every worker has left."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        staleness: int,
        workers: int,
        total_steps: int,
        start_step: int,
    ):
        self.params, self.optimizer, self.staleness = params, optimizer, staleness
        self.workers, self.total_steps = workers, total_steps
        self.applied = start_step * workers  # pushes the budget has counted, resumed runs included
        self.rounds = start_step  # with s = 0: rounds applied
        self.round_sum: torch.Tensor | None = None
        # Gradients summed into this round, and their learning rate.
        self.round_count, self.lr = 0, 0.0
        self.round_pushed: set[int] = set()  # workers that pushed (accepted or not) in this round
        self.size = sum(p.numel() for p in params)
        self.name = "parameter server"
        self.clocks, self.stats = Clocks(), Stats()
        self.changed = threading.Condition()
        self.joined, self.started = 0, False

    @property
    def step(self) -> int:
        """Global batches applied: rounds under s = 0, otherwise pushes / workers."""
        done = self.rounds if self.staleness == 0 else self.applied // self.workers
        return min(done, self.total_steps)

    def serve(self, store: SignedStore, prefix: str, timeout_s: float, lease_s: float) -> None:
        """Accept workers (joins are numbered in the store) until the budget is spent and no worker
        is connected; every worker gets a thread."""
        self.name = f"parameter server {prefix.removeprefix('server')}"
        threads: list[threading.Thread] = []
        idle_since = time.monotonic()
        accepting = True
        while True:
            try:  # no joins once the budget is spent: rank 0 may end, and its store with it
                if accepting and self.step < self.total_steps:
                    threads += self._accept(store, prefix, timeout_s)
            except dist.DistNetworkError:  # the store's host (rank 0, unless the launcher) ended
                accepting = False
            threads = [t for t in threads if t.is_alive()]
            if threads:
                idle_since = time.monotonic()
            elif self.joined and (self.step >= self.total_steps or not accepting):
                return
            elif time.monotonic() - idle_since > (lease_s if self.joined else timeout_s):
                raise TimeoutError(
                    f"no worker connected to the parameter server for "
                    f"{time.monotonic() - idle_since:.0f}s before the job's steps were done"
                )
            time.sleep(0.01)

    def _accept(self, store: SignedStore, prefix: str, timeout_s: float) -> list[threading.Thread]:
        key = f"{prefix}/join/{self.joined + 1}"
        if not store.check([key]):
            return []
        self.joined += 1
        try:
            worker = int(store.get(key))
        except (UnsignedValue, ValueError):
            self._refuse(f"join {self.joined}: not signed with the job's secret")
            return []
        thread = threading.Thread(
            target=self._connection,
            daemon=True,
            args=(worker, self.joined, store, f"{prefix}/pair/{self.joined}", timeout_s),
        )
        thread.start()
        return [thread]

    def _refuse(self, what: str) -> None:
        with self.changed:
            self.stats.refused += 1
        print(
            f"warning: {self.name} refused a peer: {what}; it gets nothing and training goes on",
            file=sys.stderr,
            flush=True,
        )

    def _connection(
        self, worker: int, number: int, store: SignedStore, key: str, timeout_s: float
    ) -> None:
        """Serve one worker's connection (its ``number``-th join) until it closes."""
        try:
            group = pair_group(store, key, 0, timeout_s)
            if not challenge(group, store.secret, key):
                self._refuse(
                    f"worker {worker} (join {number}) did not prove it holds the job's secret"
                )
                return
        except RuntimeError as exc:  # an unsigned address in the store, or the peer went away
            reason = str(exc).splitlines()[0][:200]
            self._refuse(f"worker {worker} (join {number}) could not connect: {reason}")
            return
        header = torch.zeros(HEADER, dtype=torch.float64)
        try:
            while True:
                group.recv([header], 1, 0).wait()
                if header[0] == SNAPSHOT:
                    self._send_snapshot(group)
                    continue
                if header[0] == PUSH:
                    grads, problem = self._receive_push(group, header)
                    if problem:
                        self._reject(worker, number, problem)
                    self._apply(worker, grads, float(header[1]))
                else:
                    self._join(worker, number)
                self._reply(worker, group)
        # RuntimeError: the worker closed its group (finished or died), or we did.
        except (RuntimeError, Unreadable) as exc:
            if isinstance(exc, Unreadable):
                self._reject(worker, number, f"{exc}; its connection is closed")
            with self.changed:
                # Unless a restarted worker has replaced this connection already.
                if self.clocks.connection.get(worker) == number:
                    self.clocks.live.pop(worker, None)
                self._maybe_apply_round()
                self.changed.notify_all()

    def _receive_push(
        self, group: dist.ProcessGroup, header: torch.Tensor
    ) -> tuple[torch.Tensor | None, str]:
        """A push's gradients, or None and what is wrong with the push. A push that is empty,
        larger than the shard or of no whole size is not read at all: the connection is closed."""
        declared, lr = float(header[2]), float(header[1])
        if declared != self.size:
            if not (1 <= declared < self.size and declared.is_integer()):
                raise Unreadable(f"{declared:g} gradient values for a shard of {self.size}")
            group.recv([torch.empty(int(declared))], 1, 0).wait()
            return None, f"{declared:g} gradient values for a shard of {self.size}"
        grads = torch.empty(self.size)
        group.recv([grads], 1, 0).wait()
        if not math.isfinite(lr) or lr < 0:
            return None, f"learning rate {lr:g}"
        if not bool(torch.isfinite(grads).all()):
            return None, f"{int((~torch.isfinite(grads)).sum())} non-finite gradient values"
        return grads, ""

    def _reject(self, worker: int, number: int, problem: str) -> None:
        with self.changed:
            self.stats.rejected += 1
        print(
            f"warning: {self.name} rejected a push from worker {worker} (join {number}): "
            f"{problem}; it changes nothing and training goes on",
            file=sys.stderr,
            flush=True,
        )

    def _join(self, worker: int, number: int) -> None:
        with self.changed:  # a (re)joining worker starts at the slowest clock: it waits for no one
            others = [c for w, c in self.clocks.live.items() if w != worker]
            self.clocks.live[worker] = min(others, default=0)
            self.clocks.connection[worker] = number
            self.changed.notify_all()

    def _apply(self, worker: int, grads: torch.Tensor | None, lr: float) -> None:
        """One push: its gradients (None: rejected) are applied, or summed into the round; a
        rejected push still counts against the budget and moves the worker's clock."""
        with self.changed:
            clock = self.clocks.live[worker]
            if self.step < self.total_steps:
                if grads is not None:
                    stale = clock - self.clocks.read_at.get(worker, clock)
                    self.stats.pushes += 1
                    self.stats.staleness_sum += stale
                    self.stats.staleness_max = max(self.stats.staleness_max, stale)
                if self.staleness == 0:
                    self.round_pushed.add(worker)
                    if grads is not None:
                        self.round_sum = grads if self.round_sum is None else self.round_sum + grads
                        self.round_count += 1
                        self.lr = lr
                else:
                    if grads is not None:
                        self._optimizer_step(grads, lr)
                    self.applied += 1
            self.clocks.live[worker] = clock + 1
            self._maybe_apply_round()
            self.changed.notify_all()

    def _maybe_apply_round(self) -> None:
        """s = 0: once every live worker pushed this round, apply the mean of its accepted
        gradients."""
        if not self.round_pushed or not set(self.clocks.live) <= self.round_pushed:
            return
        if self.round_sum is not None:
            self._optimizer_step(self.round_sum / self.round_count, self.lr)
        self.round_sum, self.round_count, self.round_pushed = None, 0, set()
        self.rounds += 1

    def _optimizer_step(self, grads: torch.Tensor, lr: float) -> None:
        start = time.perf_counter()
        fresh = [torch.empty_like(param) for param in self.params]
        for param, grad in zip(self.params, fresh, strict=True):
            param.grad = grad
        unflatten_into(grads, fresh)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        self.stats.busy_s += time.perf_counter() - start

    def _reply(self, worker: int, group: dist.ProcessGroup) -> None:
        """Wait for the staleness bound, then send (step, pushes, staleness max and sum, live
        workers, seconds spent applying) and the shard's values."""
        with self.changed:
            while not self.started:  # the job starts once every worker has joined: round 0 is whole
                self.started = len(self.clocks.live) >= self.workers
                if not self.started:
                    self.changed.wait(timeout=1.0)
            clock = self.clocks.live[worker]
            while (
                self.staleness >= 0
                and self.step < self.total_steps
                and self.clocks.slowest < clock - self.staleness
            ):
                self.changed.wait(timeout=1.0)
            self.clocks.read_at[worker] = self.clocks.slowest
            s = self.stats
            header = message(
                self.step,
                s.pushes,
                s.staleness_max,
                s.staleness_sum,
                len(self.clocks.live),
                s.busy_s,
                s.rejected,
                s.refused,
            )
            values = flatten(self.params)
        group.send([header], 1, 0).wait()
        group.send([values], 1, 0).wait()

    def _send_snapshot(self, group: dist.ProcessGroup) -> None:
        """The shard's parameters and then each one's optimizer state, entries in name order."""
        with self.changed:
            create_missing_state(self.optimizer)
            tensors = list(self.params)
            for param in self.params:
                tensors += [value for _, value in sorted(self.optimizer.state[param].items())]
            flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
        group.send([message(flat.numel())], 1, 0).wait()
        group.send([flat], 1, 0).wait()
