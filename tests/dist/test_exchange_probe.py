"""The exchange probe that ``plan --validate`` prices ring hops and all-to-alls with."""

from __future__ import annotations

import dataclasses
import math

import pytest

from clusterlm.bench.exchange_probe import measure_exchange_waits
from clusterlm.bench.layout_runs import local_link


def test_the_probe_returns_the_waits_of_each_pattern():
    waits = measure_exchange_waits(2, rounds=40)  # run_local bounds it with its own timeout
    assert all(0.0 <= wait < 1.0 for wait in dataclasses.astuple(waits))


def test_one_process_has_no_link_and_the_probe_needs_two():
    link = local_link(1)
    assert link.bandwidth == math.inf and link.exchange_waits(2).after == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        measure_exchange_waits(1)
