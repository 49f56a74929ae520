"""Context parallelism and document masking: layouts and combinations checked from the config."""

import pytest

from clusterlm.config import build_config
from clusterlm.config.degrees import check_layout
from clusterlm.errors import UserError


def _config(**values):
    return build_config(
        "configs/nano-cpu.toml", {k.replace("__", "."): v for k, v in values.items()}
    )


def test_context_parallel_ranks_are_not_data_parallel_ranks():
    cfg = _config(parallel__cp="2")
    assert check_layout(cfg, 4) == (2, 1)
    assert check_layout(_config(parallel__cp="2", parallel__data_parallel="zero3"), 8) == (1, 4)


@pytest.mark.parametrize(
    "values,message",
    [
        (
            {"parallel__cp": "2", "parallel__tp": "2", "parallel__sequence_parallel": "true"},
            "parallel.cp > 1 does not work with parallel.sequence_parallel",
        ),
        ({"parallel__cp": "2", "parallel__data_parallel": "diloco"}, "diloco"),
        ({"parallel__cp": "2", "model__dropout": "0.1"}, "ring has no attention dropout"),
        (
            {"parallel__cp": "2", "model__flavour": "llama", "model__moe_experts": "4"},
            "parallel.cp > 1 does not work with model.moe_experts",
        ),
        ({"parallel__cp": "2", "model__flavour": "mbart"}, "model.flavour = mbart"),
        ({"data__document_masking": "true", "model__flavour": "mbart"}, "mbart"),
        (
            {
                "model__position_reset": "true",
                "parallel__tp": "2",
                "parallel__sequence_parallel": "true",
            },
            "sequence_parallel",
        ),
    ],
)
def test_unsupported_combinations_fail_with_one_line(values, message):
    with pytest.raises(UserError, match=message) as err:
        _config(**values)
    assert "\n" not in str(err.value)


def test_tensor_parallel_with_context_parallel_needs_fsdp():
    with pytest.raises(UserError, match="composes with zero2, zero3 or hsdp"):
        check_layout(_config(parallel__cp="2", parallel__tp="2"), 4)
