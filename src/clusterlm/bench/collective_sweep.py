"""All-reduce timing on N local processes (`clusterlm bench comm`, and the link `plan --validate`
uses).

For each algorithm and size, after ``warmup`` untimed all-reduces, ``iters`` all-reduces run
back to back and are timed together, as nccl-tests does (more when that would take under 20 ms,
fewer past 0.25 s). The whole sweep of sizes and algorithms runs five times over, and each point
keeps its median group, each group taken at the slowest rank; the spread of the middle repeats is
printed with it, since no model can predict a point closer than the point repeats. Bandwidths
follow nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n. Per algorithm an alpha-beta
model t = alpha + beta * bytes is fitted over sizes >= 64 KiB, minimizing the largest relative
error; alpha is the latency, 1/beta the asymptotic bandwidth. A second fit gives small and large
messages a line each, split where that fits best (on a host, where buffers stop fitting the
caches).

``measure_link`` runs the same sweep with ``dist.all_reduce`` over 4 KiB .. 4 MiB and reads the
fit as a ring all-reduce: t = 2(n-1) * latency + 2(n-1)/n * bytes / bandwidth.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clusterlm.comm.allreduce import ALGORITHMS, all_reduce
from clusterlm.distributed.local_spawn import run_local
from clusterlm.errors import UserError
from clusterlm.plan.cluster import Link

FIT_MIN_BYTES = 64 << 10
REPEATS = 5
GROUP_SECONDS = 0.25
MIN_GROUP_SECONDS = 0.02
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
LINK_SWEEP_BYTES = tuple(4 << (2 * i) for i in range(5, 11))  # 4 KiB .. 4 MiB, for measure_link


@dataclass(frozen=True)
class Measurement:
    algorithm: str
    bytes: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float
    spread: float  # (4th - 2nd of the sorted repeats) / median: how much the host moved the point


@dataclass(frozen=True)
class Fit:
    algorithm: str
    alpha_us: float
    inverse_beta_gbps: float  # asymptotic bandwidth, GB/s (1e9 bytes)
    max_relative_error: float
    sizes_fitted: int
    # Two regimes, split after ``split_bytes`` (None when there are too few sizes for two).
    split_bytes: int | None = None
    small_alpha_us: float | None = None
    small_inverse_beta_gbps: float | None = None
    large_alpha_us: float | None = None
    large_inverse_beta_gbps: float | None = None
    two_regime_max_relative_error: float | None = None


def parse_size(text: str) -> int:
    """'4096', '64K', '256M', '1G' (binary units) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip().upper())
    if not match or int(match.group(1)) == 0:
        raise UserError(
            f"bad size {text!r}; use a positive number of bytes with an optional K, M or G suffix"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_sizes(spec: str, factor: int) -> list[int]:
    """'1K..256M' (stepping by ``factor``) or a comma list '1K,1M' -> sorted byte sizes,
    multiples of 4."""
    if ".." in spec:
        low, high = (parse_size(part) for part in spec.split("..", 1))
        if low > high:
            raise UserError(f"bad size range {spec!r}: the first size must not exceed the second")
        sizes = [low * factor**i for i in range(int(math.log(high / low, factor) + 1e-9) + 1)]
    else:
        sizes = [parse_size(part) for part in spec.split(",")]
    if any(size % 4 for size in sizes):
        raise UserError(f"sizes {spec!r} must be whole float32 tensors: multiples of 4 bytes")
    return sorted(set(sizes))


def human_bytes(size: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def fit_alpha_beta(points: list[tuple[int, float]]) -> tuple[float, float, float] | None:
    """(alpha, beta, max relative error) of t = alpha + beta * bytes with the smallest maximum
    relative error over ``points`` (a Chebyshev fit: the error that is quoted is the one that is
    minimized); None with fewer than two sizes.

    By the alternation theorem the best line for two parameters has equal, alternating errors at
    three of the points, so every triple is tried (a handful of sizes: cheap and exact)."""
    if len(points) < 2:
        return None
    sizes = np.array([b for b, _ in points], dtype=np.float64)
    times = np.array([t for _, t in points], dtype=np.float64)

    def max_error(alpha: float, beta: float) -> float:
        return float(np.abs((alpha + beta * sizes) / times - 1).max())

    if len(points) == 2:
        beta = (times[1] - times[0]) / (sizes[1] - sizes[0]) if sizes[1] != sizes[0] else 0.0
        alpha = times[0] - beta * sizes[0]
        return float(alpha), float(beta), max_error(alpha, beta)
    best = None
    for i, j, k in itertools.combinations(range(len(points)), 3):
        for sign in (1.0, -1.0):
            # (alpha + beta s) / t - 1 = sign * (+E, -E, +E) at points i, j, k.
            rows, rhs = [], []
            for index, alternation in ((i, 1.0), (j, -1.0), (k, 1.0)):
                rows.append([1 / times[index], sizes[index] / times[index], -sign * alternation])
                rhs.append(1.0)
            try:
                alpha, beta, _ = np.linalg.solve(np.array(rows), np.array(rhs))
            except np.linalg.LinAlgError:
                continue
            error = max_error(alpha, beta)
            if best is None or error < best[2]:
                best = (float(alpha), float(beta), error)
    return best


def fit_two_regimes(
    points: list[tuple[int, float]],
) -> tuple[int, tuple[float, float], tuple[float, float], float] | None:
    """Alpha-beta lines for small and large messages, split where the maximum relative error of
    the pair is smallest: (largest size of the small regime, (alpha, beta) small, (alpha, beta)
    large, max relative error). On a host the per-byte cost changes when the buffers stop fitting
    the caches, which one line cannot follow. Each regime needs at least three sizes."""
    points = sorted(points)
    best = None
    for split in range(3, len(points) - 2):
        small, large = fit_alpha_beta(points[:split]), fit_alpha_beta(points[split:])
        assert small is not None and large is not None  # each has three sizes or more
        error = max(small[2], large[2])
        if best is None or error < best[3]:
            best = (points[split - 1][0], small[:2], large[:2], error)
    return best


def _options_for(algorithm: str, options: Mapping[str, int]) -> dict[str, Any]:
    accepted = inspect.signature(ALGORITHMS[algorithm]).parameters
    return {key: value for key, value in options.items() if key in accepted}


def _group_length(run, iters: int) -> int:
    """``iters`` iterations per timed group, more when a group would last under MIN_GROUP_SECONDS
    (a short stall of one rank then averages out inside it), fewer past GROUP_SECONDS. Every rank
    must agree, so the slowest rank's estimate decides."""
    estimate = torch.empty(1, dtype=torch.float64)
    start = time.perf_counter()
    run()
    estimate[0] = time.perf_counter() - start
    dist.all_reduce(estimate, op=dist.ReduceOp.MAX)
    seconds = estimate.item()
    return max(
        1, min(max(iters, math.ceil(MIN_GROUP_SECONDS / seconds)), int(GROUP_SECONDS / seconds))
    )


def _time_all_reduces(
    rank: int,
    world_size: int,
    algorithms: list[str],
    sizes: list[int],
    iters: int,
    warmup: int,
    options: dict[str, int],
) -> list[tuple[str, int, list[float]]]:
    """(algorithm, bytes, each repeat's seconds at the slowest rank) for every combination."""
    largest = torch.zeros(max(sizes) // 4)  # zeros stay zeros: no overflow over many sums
    points = [(size, algorithm) for size in sizes for algorithm in algorithms]
    groups: list[int] = []
    elapsed = torch.empty(len(points), REPEATS, dtype=torch.float64)
    # nccl-tests style: back-to-back iterations, timed as a group, so one rank being descheduled
    # at a barrier does not count as latency. The repeats of a point are whole passes over the
    # sweep apart, so a slow spell of the host (seconds, on a shared machine) spoils one repeat of
    # the points it meets, and their medians drop it.
    for r in range(REPEATS):
        for i, (size, algorithm) in enumerate(points):
            run = partial(
                all_reduce,
                largest[: size // 4],
                "sum",
                algorithm,
                **_options_for(algorithm, options),
            )
            if r == 0:
                for _ in range(warmup):
                    run()
                groups.append(_group_length(run, iters))
            dist.barrier()
            start = time.perf_counter()
            for _ in range(groups[i]):
                run()
            elapsed[i, r] = (time.perf_counter() - start) / groups[i]
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return [(a, size, row) for (size, a), row in zip(points, elapsed.tolist(), strict=True)]


def measure(
    nproc: int,
    algorithms: Sequence[str],
    sizes: Sequence[int],
    iters: int = 10,
    warmup: int = 2,
    options: Mapping[str, int] | None = None,
    timeout: float = 1800,
) -> list[Measurement]:
    """Time every (algorithm, size) on ``nproc`` local gloo processes (module docstring);
    ``options`` (chunk_bytes, pipeline_depth) go to the algorithms that accept them."""
    raw = run_local(
        _time_all_reduces,
        nproc,
        list(algorithms),
        list(sizes),
        iters,
        warmup,
        dict(options or {}),
        timeout=timeout,
    )[0]
    bus_factor = 2 * (nproc - 1) / nproc
    measurements = []
    for algorithm, size, repeats in raw:
        seconds, middle = statistics.median(repeats), sorted(repeats)[1:-1]
        algbw = size / seconds / 1e9
        spread = (middle[-1] - middle[0]) / seconds
        measurements.append(
            Measurement(algorithm, size, seconds * 1e6, algbw, algbw * bus_factor, spread)
        )
    return measurements


def _bandwidth_gbps(beta: float) -> float:
    return 1 / beta / 1e9 if beta > 0 else math.inf


def _points(
    measurements: list[Measurement], algorithm: str, min_bytes: int = 0
) -> list[tuple[int, float]]:
    """(bytes, seconds) of ``algorithm``'s measurements of at least ``min_bytes``."""
    return [
        (m.bytes, m.time_us * 1e-6)
        for m in measurements
        if m.algorithm == algorithm and m.bytes >= min_bytes
    ]


def fits(measurements: list[Measurement]) -> list[Fit]:
    """Per algorithm, the one-line and two-regime fits over sizes >= FIT_MIN_BYTES."""
    result = []
    for algorithm in dict.fromkeys(m.algorithm for m in measurements):
        points = _points(measurements, algorithm, FIT_MIN_BYTES)
        fitted = fit_alpha_beta(points)
        if fitted is None:
            continue
        alpha, beta, error = fitted
        fit = Fit(algorithm, alpha * 1e6, _bandwidth_gbps(beta), error, len(points))
        regimes = fit_two_regimes(points)
        if regimes is not None:
            split, (small_alpha, small_beta), (large_alpha, large_beta), regime_error = regimes
            fit = replace(
                fit,
                split_bytes=split,
                small_alpha_us=small_alpha * 1e6,
                small_inverse_beta_gbps=_bandwidth_gbps(small_beta),
                large_alpha_us=large_alpha * 1e6,
                large_inverse_beta_gbps=_bandwidth_gbps(large_beta),
                two_regime_max_relative_error=regime_error,
            )
        result.append(fit)
    return result


def measure_link(nproc: int, iters: int = 10) -> Link:
    """The link of ``nproc`` local gloo processes, from a ``dist.all_reduce`` sweep over
    LINK_SWEEP_BYTES timed as ``measure`` does and fitted as alpha + beta * bytes
    (``fit_alpha_beta``): a ring all-reduce takes 2(n-1) latencies and moves 2(n-1)/n of the buffer
    over each link, so latency = alpha / (2(n-1)) and bandwidth = 2(n-1)/n / beta."""
    if nproc < 2:
        raise ValueError(f"measure_link needs at least 2 processes, got {nproc}")
    measured = measure(nproc, ["native"], LINK_SWEEP_BYTES, iters, warmup=1, timeout=120)
    fitted = fit_alpha_beta(_points(measured, "native"))
    assert fitted is not None  # LINK_SWEEP_BYTES holds several sizes
    alpha, beta, _ = fitted
    steps = 2 * (nproc - 1)
    return Link(bandwidth=steps / nproc / max(beta, 1e-15), latency=max(alpha, 0.0) / steps)
