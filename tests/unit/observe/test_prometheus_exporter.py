"""The Prometheus exporter: the dashboard reads only exported metrics, and a busy port is one
line."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from clusterlm.errors import UserError
from clusterlm.observe.prometheus import PrometheusExporter, exported_names

DASHBOARD = Path(__file__).resolve().parents[3] / "dashboards" / "clusterlm-grafana.json"


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
        exporter.update(
            {"step": 7, "loss": 2.5, "mfu": float("nan")},
            {
                0: {"step_s": 0.05, "net_recv_bytes": 100.0},
                1: {"step_s": 0.1, "net_recv_bytes": 50.0},
            },
        )
        exporter.update({"step": 8}, {0: {"net_recv_bytes": 160.0}})
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        assert "clusterlm_step 8.0" in text and "clusterlm_loss 2.5" in text
        assert (
            "clusterlm_mfu" not in text and "clusterlm_restarts" not in text
        )  # never set: not exposed as 0
        assert 'clusterlm_rank_step_seconds{rank="1"} 0.1' in text
        assert 'clusterlm_system_network_receive_bytes_total{rank="0"} 160.0' in text
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*free port"):
            PrometheusExporter("127.0.0.1", port)
    finally:
        exporter.close()
