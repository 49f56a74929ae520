"""Config checks: impossible values fail at start with one line naming the key."""

import pytest

from clusterlm.config import build_config
from clusterlm.errors import UserError


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optim.lr", "0", "optim.lr must be positive"),
        ("optim.lr", "-1e-3", "optim.lr must be positive"),
        ("model.n_head", "3", "must divide model.n_embd"),
        ("model.decoder_layers", "2", "model.flavour = gpt2 has no decoder of its own"),
        ("model.decoder_layers", "-1", "model.decoder_layers must be"),
        ("training.seq_len", "65", "exceeds the model's context"),
        ("training.steps", "many", "must be an integer"),
        ("training.precision", "fp8", "must be one of auto, fp32, bf16, fp16"),
        ("training.compile", "maybe", "must be true or false"),
        ("model.dropout", "1.5", "model.dropout must be in"),
        ("optim.min_lr", "1", "must not exceed optim.lr"),
        ("comm.reduce_scatter", "ring", "applies to parallel.data_parallel = zero2, zero3 or hsdp"),
        ("comm.reduce_scatter", "tree", "must be one of auto, native, ring"),
    ],
)
def test_impossible_values_fail_with_one_line(key, value, message):
    with pytest.raises(UserError, match=message) as err:
        build_config("configs/nano-cpu.toml", {key: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"checkpoint.preempt_grace_s": 0}, "preempt_grace_s must be positive"),
    ],
)
def test_bad_fault_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        build_config(None, overrides)
