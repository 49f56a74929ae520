"""Single-process parts of the communication benchmark: argument parsing, the alpha-beta fit, the
report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusterlm.bench.collective_sweep import (
    Measurement,
    fit_alpha_beta,
    fit_two_regimes,
    fits,
    human_bytes,
    parse_size,
    parse_sizes,
)
from clusterlm.bench.sweep_report import format_report, plot, write_json
from clusterlm.cli.bench_comm import main
from clusterlm.errors import UserError


def test_sizes_parse_with_binary_suffixes_and_step_by_the_factor():
    assert parse_size("4096") == 4096 and parse_size("64K") == 65536 and parse_size("1g") == 1 << 30
    assert parse_sizes("1K..16K", 2) == [1024, 2048, 4096, 8192, 16384]
    assert parse_sizes("1K..256M", 4)[-1] == 256 << 20 and len(parse_sizes("1K..256M", 4)) == 10
    assert parse_sizes("1M,4K", 4) == [4096, 1 << 20]
    assert human_bytes(256 << 20) == "256M" and human_bytes(1000) == "1000"


@pytest.mark.parametrize(
    "argv",
    [
        ["--sizes", "12Q"],
        ["--sizes", "4M..1K"],
        ["--sizes", "6"],
        ["--algorithms", "ring,carrier_pigeon"],
        ["--nproc", "0"],
        ["--iters", "many"],
        ["--chunk-bytes", "0"],
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_raise_one_line_user_errors(argv):
    with pytest.raises(UserError) as error:
        main(argv)
    assert "\n" not in str(error.value)


def test_alpha_beta_fit_recovers_a_linear_model():
    alpha, beta = 50e-6, 1 / 2e9  # 50 us latency, 2 GB/s
    points = [(size, alpha + beta * size) for size in (1 << 16, 1 << 18, 1 << 20, 1 << 22)]
    fitted_alpha, fitted_beta, max_error = fit_alpha_beta(points)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-6)
    assert fitted_beta == pytest.approx(beta, rel=1e-6)
    assert max_error < 1e-9
    assert fit_alpha_beta(points[:1]) is None


def test_alpha_beta_fit_minimizes_the_largest_relative_error():
    rng = np.random.default_rng(0)
    sizes = [1 << k for k in range(16, 29)]
    points = [(s, (100e-6 + s / 1e9) * (1 + 0.2 * rng.uniform(-1, 1))) for s in sizes]
    alpha, beta, max_error = fit_alpha_beta(points)
    assert max_error == pytest.approx(max(abs((alpha + beta * s) / t - 1) for s, t in points))
    # No line does better: least squares on relative error (the previous fit) and random nudges.
    sizes_a, times_a = np.array(sizes, float), np.array([t for _, t in points])
    (ls_alpha, ls_beta), *_ = np.linalg.lstsq(
        np.stack([1 / times_a, sizes_a / times_a], 1), np.ones(len(sizes)), rcond=None
    )
    assert max_error <= np.abs((ls_alpha + ls_beta * sizes_a) / times_a - 1).max() + 1e-12
    for _ in range(200):
        a, b = alpha * (1 + rng.normal(0, 0.05)), beta * (1 + rng.normal(0, 0.05))
        assert max_error <= np.abs((a + b * sizes_a) / times_a - 1).max() + 1e-12


def test_two_regime_fit_finds_where_the_per_byte_cost_changes():
    small = [(s, 1e-3 + s / 2e9) for s in (1 << 16, 1 << 18, 1 << 20, 1 << 22)]
    large = [(s, 5e-3 + s / 0.5e9) for s in (1 << 24, 1 << 26, 1 << 28)]
    split, (a_small, b_small), (a_large, b_large), error = fit_two_regimes(small + large)
    assert split == 1 << 22
    assert (a_small, b_small) == (pytest.approx(1e-3), pytest.approx(1 / 2e9))
    assert (a_large, b_large) == (pytest.approx(5e-3), pytest.approx(1 / 0.5e9))
    assert error < 1e-9
    assert fit_two_regimes(small) is None  # too few sizes for two regimes of three


def fake_measurements() -> list[Measurement]:
    """Two algorithms on an exact alpha-beta line: 20 us + bytes / 1 GB/s and / 2 GB/s."""
    return [
        Measurement(
            algorithm,
            size,
            20 + size / gbps / 1e3,
            size / (20e3 + size / gbps),
            size / (20e3 + size / gbps),
            0.01,
        )
        for algorithm, gbps in (("native", 1.0), ("ring", 2.0))
        for size in (64 << 10, 256 << 10, 1 << 20, 4 << 20)
    ]


def test_fits_recover_each_algorithm_and_the_report_files_are_written_whole(tmp_path):
    measurements = fake_measurements()
    fitted = fits(measurements)
    assert [f.algorithm for f in fitted] == ["native", "ring"]
    assert [f.alpha_us for f in fitted] == [pytest.approx(20), pytest.approx(20)]
    assert [f.inverse_beta_gbps for f in fitted] == [pytest.approx(1), pytest.approx(2)]
    assert "1/beta (GB/s)" in format_report(measurements, fitted, 2)
    report = write_json(tmp_path / "out" / "comm.json", 2, 3, 1, measurements, fitted)
    data = json.loads(report.read_text())
    assert (data["world_size"], data["iters"], data["warmup"]) == (2, 3, 1)
    assert len(data["measurements"]) == 8 and [f["algorithm"] for f in data["fits"]] == [
        "native",
        "ring",
    ]
    figure = plot(tmp_path / "comm.png", measurements, 2)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "comm.json",
        "comm.png",
        "out",
    ]  # no temporaries left
