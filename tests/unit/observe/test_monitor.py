"""Monitoring pieces that need no second process: the exporter's names and port errors, the
Grafana dashboard against them, system samples, straggler figures, and load-balancing arithmetic."""

from __future__ import annotations

import socket

import pytest

from clusterlm.config import build_config
from clusterlm.errors import UserError
from clusterlm.observe.prometheus import PrometheusExporter


@pytest.mark.parametrize(
    "override,message",
    [
        (
            {"parallel.load_balance": True, "parallel.data_parallel": "hsdp"},
            "parallel.load_balance works with",
        ),
        ({"parallel.load_balance_counts": "3,1"}, "needs parallel.load_balance"),
        ({"metrics.prometheus_port": 70000}, "metrics.prometheus_port"),
        ({"metrics.straggler_ratio": 0.5}, "metrics.straggler_ratio"),
    ],
)
def test_bad_monitoring_config_is_one_line(override, message):
    with pytest.raises(UserError, match=message):
        build_config(None, override)


def test_port_in_use_is_refused_at_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="choose a free port"):
            PrometheusExporter("127.0.0.1", busy.getsockname()[1])
