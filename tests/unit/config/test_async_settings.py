"""Bad settings of the asynchronous strategies fail at start with one line naming the fix."""

import pytest

from clusterlm.config import build_config
from clusterlm.config.degrees import check_layout, resolve_degrees
from clusterlm.errors import UserError


@pytest.mark.parametrize(
    "values,message",
    [
        ({"parallel.ps_staleness": "-2"}, "parallel.ps_staleness is -1 .* or a bound >= 0, got -2"),
        ({"parallel.local_steps": "0"}, "parallel.local_steps must be >= 1, got 0"),
        (
            {"parallel.data_parallel": "ps", "parallel.tp": "2"},
            "ps keeps a whole model per worker; set parallel.tp = 1",
        ),
        ({"parallel.data_parallel": "ps", "parallel.pp": "2"}, "ps keeps a whole model per worker"),
        ({"parallel.outer_momentum": "1"}, "parallel.outer_momentum must be in \\[0, 1\\)"),
    ],
)
def test_bad_async_settings_are_one_line(values, message):
    with pytest.raises(UserError, match=message) as err:
        build_config(None, values)
    assert "\n" not in str(err.value)


def test_ps_needs_a_worker():
    cfg = build_config(None, {"parallel.data_parallel": "ps", "parallel.ps_servers": "2"})
    with pytest.raises(
        UserError, match="leaves no worker among the 2 processes; launch more processes"
    ):
        check_layout(cfg, 2)
    assert check_layout(cfg, 5) == (3, 1)  # the mesh spans the three workers


@pytest.mark.parametrize("strategy", ["local_sgd", "diloco"])
def test_local_strategies_replicate_over_every_rank(strategy):
    cfg = build_config(None, {"parallel.data_parallel": strategy})
    assert resolve_degrees(cfg.parallel, 4) == (4, 1)
