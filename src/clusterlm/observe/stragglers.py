"""Stragglers: how much slower the slowest rank's step is than the median, and whether that
crosses ``metrics.straggler_ratio``."""

from __future__ import annotations

import statistics
from typing import Any


def straggler_figures(times: list[float], threshold: float) -> dict[str, Any]:
    """Min, median and max step time across ranks, the slowest rank and whether it straggles."""
    median = statistics.median(times)
    slowest = max(range(len(times)), key=lambda r: times[r])
    ratio = times[slowest] / median if median > 0 else 1.0
    return {
        "step_ms_min": 1000 * min(times),
        "step_ms_median": 1000 * median,
        "step_ms_max": 1000 * times[slowest],
        "slowest_rank": slowest,
        "straggler_ratio": ratio,
        "straggler": int(bool(threshold) and ratio > threshold),
    }
