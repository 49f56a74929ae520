import pytest

from clusterlm.config.slow_ranks import parse_slow_ranks, rank_factor
from clusterlm.errors import UserError


def test_parse_slow_ranks():
    assert parse_slow_ranks("") == {}
    assert parse_slow_ranks("1:3, 2:1.5") == {1: 3.0, 2: 1.5}
    for bad in ("1", "a:2", "1:0.5", "-1:2"):
        with pytest.raises(UserError, match="slow_ranks"):
            parse_slow_ranks(bad)


def test_rank_factor_names_a_rank_outside_the_job():
    assert rank_factor("1:3", 1, 2) == 3.0 and rank_factor("1:3", 0, 2) == 1.0
    with pytest.raises(UserError, match="rank 4, but the job has 2 ranks"):
        rank_factor("4:2", 0, 2)
