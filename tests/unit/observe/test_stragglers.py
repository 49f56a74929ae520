"""Straggler figures: min, median and max step time across ranks, and the slowest rank."""

from __future__ import annotations

import pytest

from clusterlm.observe.stragglers import straggler_figures


def test_straggler_figures():
    figures = straggler_figures([0.05, 0.06, 0.15], threshold=1.5)
    assert figures["slowest_rank"] == 2 and figures["straggler"] == 1
    assert figures["straggler_ratio"] == pytest.approx(2.5)
    assert figures["step_ms_min"] == pytest.approx(50) and figures[
        "step_ms_median"
    ] == pytest.approx(60)
    assert straggler_figures([0.05, 0.06], threshold=1.5)["straggler"] == 0
    assert straggler_figures([0.05, 0.5], threshold=0)["straggler"] == 0  # 0 = not reported
