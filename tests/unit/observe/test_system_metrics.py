"""System samples: the CPU figures of a rank."""

from __future__ import annotations

import torch

from clusterlm.observe.system_metrics import SYSTEM_KEYS, SystemSampler


def test_system_sample_has_the_cpu_figures():
    values = SystemSampler(torch.device("cpu")).sample()
    assert set(values) == set(SYSTEM_KEYS) - {"gpu_utilization", "gpu_memory_bytes"}
    assert values["rss_bytes"] > 0 and values["net_recv_bytes"] >= 0
