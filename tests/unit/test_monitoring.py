"""Monitoring pieces that need no second process: the exporter's names and port errors, the
Grafana dashboard against them, system samples, straggler figures, and load-balancing arithmetic."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from clusterlm.config import build_config
from clusterlm.data.loader import micro_batch_slots
from clusterlm.errors import UserError
from clusterlm.observe.prometheus import PrometheusExporter, exported_names
from clusterlm.observe.stragglers import straggler_figures
from clusterlm.observe.system_metrics import SYSTEM_KEYS, SystemSampler
from clusterlm.parallel.load_balance import LoadBalancer, balanced_counts, restore_counts

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "clusterlm-grafana.json"


def test_dashboard_uses_only_exported_metrics():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bclusterlm_[a-z_]+", expr)}
    assert used and used <= exported_names(), used - exported_names()
    assert exported_names() <= used, f"not on the dashboard: {exported_names() - used}"


def test_exporter_serves_and_a_busy_port_is_one_clear_line():
    exporter = PrometheusExporter("127.0.0.1", 0)
    port = exporter.server.server_port
    try:
        exporter.update({"step": 7, "loss": 2.5, "mfu": float("nan")},
                        {0: {"step_s": 0.05, "net_recv_bytes": 100.0}, 1: {"step_s": 0.1, "net_recv_bytes": 50.0}})
        exporter.update({"step": 8}, {0: {"net_recv_bytes": 160.0}})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "clusterlm_step 8.0" in text and "clusterlm_loss 2.5" in text
        assert "clusterlm_mfu" not in text and "clusterlm_restarts" not in text  # never set: not exposed as 0
        assert 'clusterlm_rank_step_seconds{rank="1"} 0.1' in text
        assert 'clusterlm_system_network_receive_bytes_total{rank="0"} 160.0' in text
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*free port"):
            PrometheusExporter("127.0.0.1", port)
    finally:
        exporter.close()


def test_system_sample_has_the_cpu_figures():
    values = SystemSampler(torch.device("cpu")).sample()
    assert set(values) == set(SYSTEM_KEYS) - {"gpu_utilization", "gpu_memory_bytes"}
    assert values["rss_bytes"] > 0 and values["net_recv_bytes"] >= 0


def test_straggler_figures():
    figures = straggler_figures([0.05, 0.06, 0.15], threshold=1.5)
    assert figures["slowest_rank"] == 2 and figures["straggler"] == 1
    assert figures["straggler_ratio"] == pytest.approx(2.5)
    assert figures["step_ms_min"] == pytest.approx(50) and figures["step_ms_median"] == pytest.approx(60)
    assert straggler_figures([0.05, 0.06], threshold=1.5)["straggler"] == 0
    assert straggler_figures([0.05, 0.5], threshold=0)["straggler"] == 0  # 0 = not reported


def test_balanced_counts_minimize_the_slowest_rank():
    assert balanced_counts([1.0, 0.5], 16) == [11, 5]
    assert balanced_counts([1.0, 1.0], 8) == [4, 4]
    assert balanced_counts([1.0, 1e-9], 8) == [7, 1]  # every rank keeps one
    assert sum(balanced_counts([3.0, 1.0, 2.0], 13)) == 13


def test_dealt_micro_batches_cover_the_step_once():
    assert [micro_batch_slots([2, 2], r) for r in (0, 1)] == [[0, 2], [1, 3]]  # the unbalanced layout
    slots = [micro_batch_slots([5, 2, 1], r) for r in range(3)]
    assert sorted(s for rank in slots for s in rank) == list(range(8))


def test_balancer_moves_only_for_a_clear_gain_and_restores_saved_counts():
    assigned = []
    balancer = LoadBalancer(assigned.append, [4, 4], interval=2, fixed=False, gather=lambda mine: [0.04, mine])
    for _ in range(2):
        balancer.observe(0.041)  # rank 1 within noise of rank 0: stays
    assert balancer.counts == [4, 4]
    for _ in range(2):
        balancer.observe(0.08)  # rank 1 half as fast
    assert balancer.counts == assigned[-1] == [6, 2]
    restore_counts(balancer, [5, 3])
    assert balancer.counts == [5, 3]
    restore_counts(balancer, [3, 3, 2])  # saved by a job of another size: measured afresh instead
    assert balancer.counts == [5, 3]


@pytest.mark.parametrize("override,message", [
    ({"parallel.load_balance": True, "parallel.data_parallel": "hsdp"}, "parallel.load_balance works with"),
    ({"parallel.load_balance_counts": "3,1"}, "needs parallel.load_balance"),
    ({"metrics.prometheus_port": 70000}, "metrics.prometheus_port"),
    ({"metrics.straggler_ratio": 0.5}, "metrics.straggler_ratio"),
])
def test_bad_monitoring_config_is_one_line(override, message):
    with pytest.raises(UserError, match=message):
        build_config(None, override)


def test_port_in_use_is_refused_at_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="choose a free port"):
            PrometheusExporter("127.0.0.1", busy.getsockname()[1])
