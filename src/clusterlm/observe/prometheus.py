"""A Prometheus exporter (``prometheus_client``) for a training job, one per node.

Each node's local rank 0 serves the job's figures (step, loss, tokens/s, MFU, straggler ratio,
checkpoint age, restarts) and the per-rank figures of its node's ranks (own step time, data-wait
share, micro-batches, system samples), labelled ``rank``. Values are updated every log
interval. The server binds to ``metrics.prometheus_host``, loopback by default.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from clusterlm.errors import UserError

JOB_GAUGES = {
    "clusterlm_step": ("step", "optimizer steps done"),
    "clusterlm_tokens": ("tokens", "tokens trained on"),
    "clusterlm_loss": ("loss", "training loss (mean over ranks) at the last log step"),
    "clusterlm_tokens_per_second": (
        "tokens_per_s",
        "training tokens per second over the last log window",
    ),
    "clusterlm_mfu": ("mfu", "model FLOPs utilization over the last log window"),
    "clusterlm_straggler_ratio": (
        "straggler_ratio",
        "slowest rank's step time over the median rank's",
    ),
    "clusterlm_straggler": (
        "straggler",
        "1 when the straggler ratio exceeds metrics.straggler_ratio",
    ),
    "clusterlm_slowest_rank": ("slowest_rank", "the rank with the longest own step time"),
    "clusterlm_checkpoint_age_seconds": (
        "checkpoint_age_s",
        "seconds since the newest checkpoint was written (since the start when there is none)",
    ),
    "clusterlm_moe_load_imbalance": (
        "moe_load_imbalance",
        "mixture of experts: max over mean tokens per expert of the worst block, last log window",
    ),
    "clusterlm_moe_aux_loss": (
        "moe_aux_loss",
        "mixture of experts: mean load-balancing loss (1 = even loads), last log window",
    ),
    "clusterlm_restarts": (
        "restarts",
        "times the launcher restarted the job (TORCHELASTIC_RESTART_COUNT)",
    ),
}
RANK_GAUGES = {
    "clusterlm_rank_step_seconds": (
        "step_s",
        "the rank's own step time, waiting for other ranks excluded",
    ),
    "clusterlm_rank_data_wait_share": (
        "data_wait_share",
        "share of the rank's step time spent loading data",
    ),
    "clusterlm_rank_micro_batches": (
        "micro_batches",
        "micro-batches per step the rank is assigned",
    ),
    "clusterlm_system_cpu_percent": (
        "cpu_percent",
        "the rank's process CPU use, percent of one core",
    ),
    "clusterlm_system_rss_bytes": ("rss_bytes", "the rank's resident memory"),
    "clusterlm_system_gpu_utilization_percent": (
        "gpu_utilization",
        "the rank's GPU utilization (NVML)",
    ),
    "clusterlm_system_gpu_memory_bytes": (
        "gpu_memory_bytes",
        "memory used on the rank's GPU (NVML)",
    ),
}
RANK_COUNTERS = {
    "clusterlm_system_network_receive_bytes": ("net_recv_bytes", "bytes the rank's host received"),
    "clusterlm_system_network_transmit_bytes": ("net_sent_bytes", "bytes the rank's host sent"),
    "clusterlm_system_disk_read_bytes": (
        "disk_read_bytes",
        "bytes the rank's process read from storage",
    ),
    "clusterlm_system_disk_write_bytes": (
        "disk_write_bytes",
        "bytes the rank's process wrote to storage",
    ),
    "clusterlm_store_read_bytes": ("store_bytes_read", "bytes the rank read from a remote store"),
    "clusterlm_cache_hits": ("cache_hits", "shard reads the rank's store cache served"),
    "clusterlm_cache_misses": ("cache_misses", "shard reads that waited for a store download"),
}


def exported_names() -> set[str]:
    """Every series name the exporter can expose (counters with their ``_total``)."""
    return set(JOB_GAUGES) | set(RANK_GAUGES) | {f"{name}_total" for name in RANK_COUNTERS}


class PrometheusExporter:
    def __init__(self, host: str, port: int):
        self.registry = CollectorRegistry()
        # Registered when first set: a gauge without labels would otherwise read 0 before it has a
        # value.
        self.job = {key: Gauge(name, doc, registry=None) for name, (key, doc) in JOB_GAUGES.items()}
        self._unset = set(self.job)
        self.ranks = {
            key: Gauge(name, doc, ["rank"], registry=self.registry)
            for name, (key, doc) in RANK_GAUGES.items()
        }
        self.counters = {
            key: Counter(name, doc, ["rank"], registry=self.registry)
            for name, (key, doc) in RANK_COUNTERS.items()
        }
        self._last: dict[tuple[str, int], float] = {}
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise UserError(
                f"metrics.prometheus_port: cannot serve on {host}:{port} ({err.strerror}); choose "
                "a free port, or 0 to turn the exporter off"
            ) from None

    def update(self, job: dict[str, Any], ranks: dict[int, dict[str, float]]) -> None:
        """Set the job's figures and, per rank, its figures (cumulative ones as counters)."""
        for key, gauge in self.job.items():
            if _present(job.get(key)):
                gauge.set(float(job[key]))
                if key in self._unset:
                    self.registry.register(gauge)
                    self._unset.discard(key)
        for rank, values in ranks.items():
            for key, gauge in self.ranks.items():
                if _present(values.get(key)):
                    gauge.labels(rank=str(rank)).set(values[key])
            for key, counter in self.counters.items():
                if _present(values.get(key)):
                    # Counters only go up: add what accumulated since the last update.
                    previous = self._last.get((key, rank), 0.0)
                    counter.labels(rank=str(rank)).inc(max(values[key] - previous, 0.0))
                    self._last[(key, rank)] = values[key]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _present(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)
