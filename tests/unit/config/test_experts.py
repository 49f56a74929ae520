"""The mixture-of-experts keys: the ``model.moe_layers`` syntax and how the keys combine."""

import pytest

from clusterlm.config import build_config
from clusterlm.config.experts import moe_layer_indices
from clusterlm.errors import UserError


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("all", (0, 1, 2, 3, 4, 5)),
        ("every:2", (1, 3, 5)),
        ("every:1", (0, 1, 2, 3, 4, 5)),
        ("after:1", (1, 2, 3, 4, 5)),
        ("after:0", (0, 1, 2, 3, 4, 5)),
        ("4,0", (0, 4)),
        (" 2 ", (2,)),
    ],
)
def test_moe_layers_syntax(spec, expected):
    assert moe_layer_indices(spec, 6) == expected


@pytest.mark.parametrize(
    "spec", ["", "some", "every:0", "every:x", "after:-1", "after:6", "1,9", "-1", "all:2"]
)
def test_bad_moe_layers_fail_with_one_line(spec):
    with pytest.raises(UserError, match="model.moe_layers") as err:
        moe_layer_indices(spec, 6)
    assert "\n" not in str(err.value)


MOE = {"model.flavour": "llama", "model.moe_experts": "4"}
ZERO2 = {"parallel.data_parallel": "zero2"}


@pytest.mark.parametrize(
    "values,message",
    [
        (
            {**MOE, "model.moe_top_k": "5"},
            "model.moe_top_k \\(5\\) exceeds model.moe_experts \\(4\\)",
        ),
        ({"model.moe_top_k": "1"}, "model.moe_top_k applies to a mixture of experts"),
        ({"model.moe_balance": "aux_loss"}, "model.moe_balance applies to a mixture of experts"),
        ({"model.moe_experts": "4"}, "needs model.flavour = llama"),
        ({**MOE, "model.moe_aux_loss_coeff": "0.1"}, "applies to model.moe_balance = aux_loss"),
        ({**MOE, "model.moe_balance": "none", "model.moe_bias_rate": "0.1"}, "aux_free"),
        ({**MOE, "model.moe_layers": "every:x"}, "model.moe_layers must be"),
        ({**MOE, "model.moe_top_k": "0"}, "model.moe_top_k must be >= 1"),
        ({**MOE, "parallel.pp": "2", "model.moe_balance": "aux_loss"}, "aux_free or parallel.pp"),
        ({**MOE, "parallel.ep": "3", **ZERO2}, "not divisible by parallel.ep \\(3\\)"),
        ({"parallel.ep": "2", **ZERO2}, "set model.moe_experts > 0 or parallel.ep = 1"),
        ({**MOE, "parallel.ep": "2"}, "parallel.ep > 1 runs with parallel.data_parallel = zero2"),
        ({**MOE, "parallel.ep": "2", **ZERO2, "training.compile": "true"}, "training.compile"),
        ({**MOE, "parallel.ep": "2", **ZERO2, "parallel.load_balance": "true"}, "load_balance"),
        ({**MOE, "parallel.tp": "2", "parallel.sequence_parallel": "true"}, "sequence_parallel"),
        ({**MOE, "parallel.data_parallel": "local_sgd"}, "parallel.data_parallel = ddp"),
    ],
)
def test_inconsistent_moe_keys_fail_with_one_line(values, message):
    with pytest.raises(UserError, match=message) as err:
        build_config("configs/nano-cpu.toml", values)
    assert "\n" not in str(err.value)


def test_a_consistent_moe_config_loads():
    cfg = build_config(
        "configs/nano-cpu.toml",
        {
            **MOE,
            "model.moe_balance": "aux_loss",
            "model.moe_aux_loss_coeff": "0.1",
            "model.moe_layers": "every:2",
        },
    )
    assert cfg.model.moe_experts == 4
