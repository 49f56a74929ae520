"""Live figures of a running job, every log interval: per-rank step times and stragglers, the
data-wait share, the load-balancing assignment, system samples, checkpoint age and restarts.

Every rank calls ``Monitor.observe`` at a log step (it gathers from all ranks). The figures go
into the training record (metrics.jsonl, TensorBoard), a ``system`` record per log step when
``metrics.system`` is on, the progress display when a rank straggles or the assignment changes,
and each node's Prometheus exporter (``metrics.prometheus_port``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from clusterlm import checkpoint
from clusterlm.config import Config
from clusterlm.distributed.runtime import Runtime, average_across_ranks
from clusterlm.observe.prometheus import PrometheusExporter
from clusterlm.observe.sinks import MetricsSinks, ProgressDisplay
from clusterlm.observe.stragglers import straggler_figures
from clusterlm.observe.system_metrics import SYSTEM_KEYS, SystemSampler
from clusterlm.parallel.load_balance import all_gather_floats, typical_seconds

STORE_KEYS = ("data_wait_s", "store_bytes_read", "cache_hits", "cache_misses")
RANK_KEYS = ("step_s", "data_wait_share", *STORE_KEYS, *SYSTEM_KEYS)


class Run(Protocol):
    """What the monitor reads of a training session."""

    cfg: Config
    runtime: Runtime
    step: int
    tokens: int
    loader: Any  # its ``loading_seconds`` and ``store_stats``
    model: Any  # its ``clock``, a ``RankClock`` or None
    balancer: Any  # a ``LoadBalancer`` or None

    @property
    def checkpoints(self) -> Path: ...


class Monitor:
    def __init__(self, session: Run, progress: ProgressDisplay):
        m = session.cfg.metrics
        self.progress = progress
        self.started = time.time()
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.system = SystemSampler(session.runtime.device) if m.system else None
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", session.runtime.world_size))
        self.node_ranks = range(
            session.runtime.rank - session.runtime.rank % local_world,
            session.runtime.rank - session.runtime.rank % local_world + local_world,
        )
        serves = m.prometheus_port and os.environ.get("LOCAL_RANK", "0") == "0"
        self.exporter = PrometheusExporter(m.prometheus_host, m.prometheus_port) if serves else None
        if self.exporter is not None:
            host, port = cast(
                tuple[str, int], self.exporter.server.server_address[:2]
            )  # an INET server's
            progress.message(f"Prometheus metrics: http://{host}:{port}/metrics")
        self._loading, self._step = session.loader.loading_seconds, session.step
        self._counts: list[int] | None = None  # the load balancer's last assignment

    def mean_loss(self, session: Run, loss: torch.Tensor) -> float:
        """The loss averaged over ranks; waiting there for a slower rank is timed as waiting."""

        def average() -> float:
            return average_across_ranks(loss, session.runtime).item()

        return session.model.clock.wait(average) if session.model.clock is not None else average()

    def observe(self, session: Run, record: dict[str, Any], sinks: MetricsSinks | None) -> None:
        """Add the window's figures to ``record`` and report them; on every rank, at a log step."""
        ranks = self._gather(session, record)
        times = [values["step_s"] for values in ranks.values()]
        record["rank_step_ms"] = [1000 * t for t in times]
        record["data_wait_share"] = statistics.mean(v["data_wait_share"] for v in ranks.values())
        shown = (
            STORE_KEYS
            if any(v["cache_hits"] + v["cache_misses"] for v in ranks.values())
            else STORE_KEYS[:1]
        )  # a remote store's figures only with one
        record.update({key: [ranks[r][key] for r in sorted(ranks)] for key in shown})
        record["checkpoint_age_s"], record["restarts"] = (
            self._checkpoint_age(session),
            self.restarts,
        )
        if len(times) > 1:
            record.update(straggler_figures(times, session.cfg.metrics.straggler_ratio))
            if record["straggler"]:
                self.progress.message(
                    f"step {session.step}: straggler: rank {record['slowest_rank']} "
                    f"takes {record['straggler_ratio']:.2f}x the median step time "
                    f"({record['step_ms_max']:.1f} ms against {record['step_ms_median']:.1f} ms)"
                )
        if session.balancer is not None:
            record["micro_batches_per_rank"] = list(session.balancer.counts)
            for rank, count in enumerate(session.balancer.counts):
                ranks[rank]["micro_batches"] = count
            if session.balancer.counts != self._counts:
                self._counts = list(session.balancer.counts)
                self.progress.message(
                    f"step {session.step}: load balance: micro-batches per rank "
                    f"{','.join(map(str, self._counts))}"
                )
        if sinks is not None and self.system is not None:
            sinks.log(
                {
                    "kind": "system",
                    "step": session.step,
                    "tokens": session.tokens,
                    **{
                        f"{key}_rank{rank}": value
                        for rank, values in ranks.items()
                        for key, value in values.items()
                        if key in SYSTEM_KEYS and not math.isnan(value)
                    },
                }
            )
        if self.exporter is not None:
            self.exporter.update(record, {rank: ranks[rank] for rank in self.node_ranks})

    def _gather(self, session: Run, record: dict[str, Any]) -> dict[int, dict[str, float]]:
        """Every rank's figures for the window, keyed by rank."""
        steps = max(session.step - self._step, 1)
        loading = session.loader.loading_seconds - self._loading
        self._loading, self._step = session.loader.loading_seconds, session.step
        wall = record["ms_per_step"] / 1000
        own = (
            typical_seconds(session.model.clock.take_own())
            if session.model.clock is not None
            else math.nan
        )
        sample = self.system.sample() if self.system is not None else {}
        store = session.loader.store_stats
        # The own step time, waiting for other ranks excluded, where a clock measured it.
        mine = {
            "step_s": wall if math.isnan(own) else own,
            "data_wait_share": loading / (steps * wall),
            "data_wait_s": loading,  # in this window; the store's figures are the run's totals
            "store_bytes_read": float(store.bytes_read),
            "cache_hits": float(store.hits),
            "cache_misses": float(store.misses),
            **sample,
        }
        values = [mine.get(key, math.nan) for key in RANK_KEYS]
        if (
            session.runtime.world_size == 1 or not session.runtime.lockstep
        ):  # a parameter server's ranks share no group
            rows = [values]
        elif session.model.clock is not None:
            rows = session.model.clock.wait(
                lambda: all_gather_floats(values, session.runtime.device)
            )
        else:
            rows = all_gather_floats(values, session.runtime.device)
        return {rank: dict(zip(RANK_KEYS, row, strict=True)) for rank, row in enumerate(rows)}

    def _checkpoint_age(self, session: Run) -> float:
        complete = checkpoint.list_complete(session.checkpoints)
        since = complete[-1].stat().st_mtime if complete else self.started
        return time.time() - since

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
