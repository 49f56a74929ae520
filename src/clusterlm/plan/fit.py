"""Fit the calibration (``clusterlm.plan.calibration``) to the step times ``plan --validate``
measured: the compute efficiency and the host costs per step, per parameter tensor through
FSDP's collectives, per tensor-parallel module pass and per pipeline action, on the cases marked
``fit`` (one per term; the 4-process ddp, zero3 and tp2 x zero3 for the core sharing, since the
share of per-collective costs spent waiting is only determined where 4 processes share 2 cores
and make tensor-parallel calls as well as FSDP's; both pipeline schedules on 2 processes, whose
step times scatter from run to run: benchmarks/planner-validation-cpu-epyc-zen4-2026-12-01.md);
the report then shows the error on all of them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from clusterlm.plan.calibration import HOST_SECONDS, Calibration
from clusterlm.plan.timing import host_calls, host_share_scales
from clusterlm.plan.validation import ValidationResult

MEASURED_LINKS = Calibration(comm_efficiency=1.0)  # the links are fitted to measured collectives


def fit_calibration(
    results: list[ValidationResult], base: Calibration = MEASURED_LINKS
) -> Calibration:
    """Compute efficiency, collective wait and the host costs minimizing the squared relative
    step-time error over the cases marked ``fit``. The step time is linear in the host costs, so for
    each efficiency on a log grid and each wait share on a linear one they are the non-negative
    least-squares solution; the best pair wins."""
    fitted = [r for r in results if r.case.fit] or results
    measured = np.array([r.measured.step_seconds for r in fitted])
    counts = np.array([host_calls(r.work, r.case.layout).counts() for r in fitted], dtype=float)
    best: tuple[float, Calibration] | None = None
    # The host costs by name (floats; Any, since ``replace`` matches ** against every field).
    no_host: dict[str, Any] = dict.fromkeys(HOST_SECONDS, 0.0)
    for efficiency in np.geomspace(0.02, 1.0, 200):
        calibration = replace(base, compute_efficiency=float(efficiency), **no_host)
        predicted = np.array([r.predicted_seconds(calibration) for r in fitted])
        for wait in np.linspace(0.0, 0.9, 10):
            # Host seconds each case spends per unit of each term, grown by its processes' core
            # share.
            features = counts * np.array(
                [host_share_scales(r.cluster.device.host_share, wait) for r in fitted]
            )
            costs = _nonnegative_least_squares(
                features / measured[:, None], 1 - predicted / measured
            )
            error = float(np.sum(((predicted + features @ costs) / measured - 1) ** 2))
            if best is None or error < best[0]:
                host: dict[str, Any] = dict(zip(HOST_SECONDS, map(float, costs), strict=True))
                best = (error, replace(calibration, collective_wait=float(wait), **host))
    assert best is not None  # the grids are not empty
    return best[1]


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0, by trying every set of free columns (there are four)."""
    best_x, best_error = np.zeros(a.shape[1]), float(np.sum(b**2))
    for free in itertools.chain.from_iterable(
        itertools.combinations(range(a.shape[1]), k) for k in range(1, a.shape[1] + 1)
    ):
        solution, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (solution < 0).any():
            continue
        x = np.zeros(a.shape[1])
        x[list(free)] = solution
        error = float(np.sum((a @ x - b) ** 2))
        if error < best_error:
            best_x, best_error = x, error
    return best_x


def fit_efficiency(ratios: Callable[[Calibration], list[float]], base: Calibration) -> Calibration:
    """The efficiency table (``compute_efficiency``, ``efficiency_half_width``) minimizing the
    squared log error of ``ratios`` (predicted / reported, one per row) under ``base``'s other
    factors: for each half-width on a grid of 10s up to 5000, the ceiling that centres the errors
    (refined three times, since communication does not scale with it); the best pair wins."""

    def centred(half: float) -> tuple[float, Calibration]:
        calibration = replace(base, efficiency_half_width=half, compute_efficiency=0.5)
        for _ in range(3):
            logs = np.log(ratios(calibration))
            ceiling = min(1.0, calibration.compute_efficiency * float(np.exp(-logs.mean())))
            calibration = replace(calibration, compute_efficiency=ceiling)
        return float(np.sum(np.log(ratios(calibration)) ** 2)), calibration

    coarse = min(range(0, 5001, 100), key=lambda half: centred(half)[0])
    fine = [float(h) for h in range(max(0, coarse - 100), coarse + 101, 10)]
    return min((centred(half) for half in fine), key=lambda pair: pair[0])[1]
