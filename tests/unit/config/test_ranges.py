"""Every numeric key is held to its range before anything starts: one line naming the key."""

import dataclasses
from pathlib import Path

import pytest

from clusterlm.config import Config, all_keys, build_config
from clusterlm.config.ranges import RANGES, numeric_values
from clusterlm.errors import UserError


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optim.lr", "inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr", "nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr", "1e999", "optim.lr must be a finite number, got inf"),
        ("optim.eps", "-1", "optim.eps must be positive, got -1.0"),
        ("optim.eps", "0", "optim.eps must be positive"),
        ("optim.beta2", "1", r"optim.beta2 must be in \[0, 1\), got 1.0"),
        ("optim.weight_decay", "-0.1", "optim.weight_decay must be >= 0"),
        ("optim.momentum", "-inf", "optim.momentum must be a finite number, got -inf"),
        (
            "parallel.hang_timeout_s",
            "nan",
            "parallel.hang_timeout_s must be a finite number, got nan",
        ),
        ("parallel.hang_timeout_s", "-1", r"parallel.hang_timeout_s must be >= 0 \(0 = off\)"),
        ("parallel.timeout_s", "0", "parallel.timeout_s must be positive"),
        ("parallel.bucket_mb", "inf", "parallel.bucket_mb must be a finite number"),
        ("parallel.outer_lr", "-0.5", "parallel.outer_lr must be positive"),
        ("parallel.ps_lease_s", "0", "parallel.ps_lease_s must be positive"),
        ("training.steps", "1e999", "training.steps must be an integer, got '1e999'"),
        (
            "training.steps",
            "1e30",
            r"training.steps must be at most 9223372036854775807 in magnitude \(64 bits\)",
        ),
        ("training.steps", "0", "training.steps must be positive, got 0"),
        ("training.grad_clip", "-1", "training.grad_clip must be >= 0"),
        ("training.grad_clip", "nan", "training.grad_clip must be a finite number"),
        ("training.seed", "-3", "training.seed must be >= 0, got -3"),
        ("training.mlm_probability", "1", r"training.mlm_probability must be in \(0, 1\)"),
        ("model.norm_eps", "0", "model.norm_eps must be positive"),
        ("model.rope_theta", "inf", "model.rope_theta must be a finite number"),
        ("model.dropout", "-0.1", r"model.dropout must be in \[0, 1\)"),
        ("comm.topk_ratio", "1.5", r"comm.topk_ratio must be in \(0, 1\]"),
        ("comm.powersgd_rank", "0", "comm.powersgd_rank must be >= 1"),
        ("checkpoint.keep_last", "0", "checkpoint.keep_last must be positive"),
        ("checkpoint.preempt_grace_s", "inf", "checkpoint.preempt_grace_s must be a finite number"),
        ("metrics.peak_flops", "-1e12", "metrics.peak_flops must be >= 0"),
        (
            "metrics.prometheus_port",
            "65536",
            r"metrics.prometheus_port must be a port number in 0..65535",
        ),
        ("finetune.head_lr", "nan", "finetune.head_lr must be a finite number"),
        (
            "parallel.ps_staleness",
            "-2",
            r"parallel.ps_staleness is -1 \(fully asynchronous\) or a bound >= 0, got -2",
        ),
    ],
)
def test_an_impossible_number_is_one_line_naming_the_key(key, value, message):
    with pytest.raises(UserError, match=message) as err:
        build_config(None, {key: value})
    assert "\n" not in str(err.value) and str(err.value).startswith(key)


def test_every_numeric_key_has_a_range():
    numeric = set(numeric_values(Config()))
    assert numeric == {key for key, f in all_keys().items() if type(f.default) in (int, float)}
    assert numeric - set(RANGES) == set()
    assert set(RANGES) - numeric == set()  # no rule for a key that is gone


@pytest.mark.parametrize(
    "key", sorted(k for k, f in all_keys().items() if type(f.default) is float)
)
def test_no_float_key_takes_an_infinity_or_nan(key):
    for value in ("inf", "-inf", "nan"):
        with pytest.raises(UserError, match=key):
            build_config(None, {key: value})


@pytest.mark.parametrize("preset", sorted(str(p) for p in Path("configs").glob("*.toml")))
def test_the_presets_pass(preset):
    build_config(preset, {})


def test_the_defaults_pass():
    assert dataclasses.asdict(Config()) == build_config(None, {}).to_dict()


def test_boundaries_that_are_allowed():
    cfg = build_config(
        None,
        {
            "parallel.hang_timeout_s": "0",
            "optim.beta1": "0",
            "comm.topk_ratio": "1",
            "parallel.ps_staleness": "-1",
            "metrics.prometheus_port": "65535",
            "training.steps": "1e3",
        },
    )
    assert cfg.training.steps == 1000 and cfg.parallel.hang_timeout_s == 0.0
