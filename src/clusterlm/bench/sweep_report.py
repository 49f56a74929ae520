"""What ``clusterlm bench comm`` writes from an all-reduce sweep (``collective_sweep``): the
printed table of measurements and alpha-beta fits, the JSON file and the bus-bandwidth plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from clusterlm.bench.collective_sweep import (
    FIT_MIN_BYTES,
    REPEATS,
    Fit,
    Measurement,
    human_bytes,
)
from clusterlm.files import atomic_write_json, atomic_write_with


def format_report(measurements: list[Measurement], fitted: list[Fit], nproc: int) -> str:
    lines = [
        f"all-reduce of float32 on {nproc} processes (gloo); "
        f"time = median of {REPEATS} passes over the sweep, each a "
        "group of back-to-back iterations at the slowest rank; "
        "spread = (4th - 2nd of the sorted passes) / time"
    ]
    lines.append(
        f"{'size':>8} {'algorithm':<17} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"
        f" {'spread':>7}"
    )
    for m in sorted(measurements, key=lambda m: m.bytes):
        lines.append(
            f"{human_bytes(m.bytes):>8} {m.algorithm:<17} {m.time_us:>11.1f} "
            f"{m.algbw_gbps:>13.3f} {m.busbw_gbps:>13.3f} {m.spread:>7.1%}"
        )
    lines.append("")
    lines.append(
        f"alpha-beta fit t = alpha + beta * bytes over sizes >= {human_bytes(FIT_MIN_BYTES)} "
        "(minimax relative error), one line and two regimes (small | large messages)"
    )
    lines.append(
        f"{'algorithm':<17} {'alpha (us)':>11} {'1/beta (GB/s)':>14} {'max rel err':>12} "
        f"{'sizes':>6}   {'split':>6} {'small: alpha, 1/beta':>22} "
        f"{'large: alpha, 1/beta':>22} {'max rel err':>12}"
    )
    for f in fitted:
        line = (
            f"{f.algorithm:<17} {f.alpha_us:>11.1f} {f.inverse_beta_gbps:>14.3f} "
            f"{f.max_relative_error:>12.1%} {f.sizes_fitted:>6}"
        )
        if f.split_bytes is not None:
            line += (
                f"   {human_bytes(f.split_bytes):>6} {f.small_alpha_us:>12.1f} us "
                f"{f.small_inverse_beta_gbps:>6.3f} {f.large_alpha_us:>12.1f} us "
                f"{f.large_inverse_beta_gbps:>6.3f}"
                f" {f.two_regime_max_relative_error:>12.1%}"
            )
        lines.append(line)
    if not fitted:
        lines.append(f"(no fit: needs at least two sizes >= {human_bytes(FIT_MIN_BYTES)})")
    return "\n".join(lines)


def write_json(
    path: str | Path,
    nproc: int,
    iters: int,
    warmup: int,
    measurements: list[Measurement],
    fitted: list[Fit],
) -> Path:
    """The measurements and fits as JSON, written atomically; returns the path."""
    report = {
        "world_size": nproc,
        "backend": "gloo",
        "dtype": "float32",
        "iters": iters,
        "warmup": warmup,
        "fit_min_bytes": FIT_MIN_BYTES,
        "measurements": [asdict(m) for m in measurements],
        "fits": [asdict(f) for f in fitted],
    }
    return atomic_write_json(path, report, indent=2)


def plot(path: str | Path, measurements: list[Measurement], nproc: int) -> Path:
    """A bus-bandwidth plot per algorithm, written atomically as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algorithm in dict.fromkeys(m.algorithm for m in measurements):
        points = [(m.bytes, m.busbw_gbps) for m in measurements if m.algorithm == algorithm]
        ax.plot(*zip(*points, strict=True), marker="o", label=algorithm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"all-reduce, {nproc} processes, gloo")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
