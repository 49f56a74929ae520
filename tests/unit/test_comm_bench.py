"""Single-process parts of the communication benchmark: argument parsing and the alpha-beta fit."""

from __future__ import annotations

import pytest

from clusterlm.comm.bench import fit_alpha_beta, human_bytes, main, parse_size, parse_sizes
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
