"""Config tree: TOML + dotted overrides, typed values, one-line errors."""

import pytest

from clusterlm.cli.options import help_text, parse_dotted_args
from clusterlm.config import Config, build_config, config_from_dict
from clusterlm.errors import UserError


def test_presets_load_and_overrides_win(tmp_path):
    cfg = build_config("configs/nano-cpu.toml", {"training.steps": "7", "optim.lr": "3e-4"})
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (4, 128, 64)
    assert cfg.training.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("name", ["default", "nano-cpu", "gpt2-124m", "llama-1b", "llama-8b"])
def test_every_preset_is_valid(name):
    build_config(f"configs/{name}.toml", {})


def test_dotted_args_both_spellings():
    assert parse_dotted_args(["--training.steps", "5", "--optim.lr=1e-3"]) == {
        "training.steps": "5", "optim.lr": "1e-3"}


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'training.steps'"):
        build_config(None, {"training.step": "5"})


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", "0", "optim.lr must be positive"),
    ("optim.lr", "-1e-3", "optim.lr must be positive"),
    ("model.n_head", "3", "must divide model.n_embd"),
    ("training.seq_len", "65", "exceeds the model's context"),
    ("training.steps", "many", "must be an integer"),
    ("training.precision", "fp8", "must be one of auto, fp32, bf16, fp16"),
    ("training.compile", "maybe", "must be true or false"),
    ("model.dropout", "1.5", "model.dropout must be in"),
    ("optim.min_lr", "1", "must not exceed optim.lr"),
    ("comm.reduce_scatter", "ring", "applies to parallel.data_parallel = zero2, zero3 or hsdp"),
    ("comm.reduce_scatter", "tree", "must be one of auto, native, ring"),
])
def test_impossible_values_fail_with_one_line(key, value, message):
    with pytest.raises(UserError, match=message) as err:
        build_config("configs/nano-cpu.toml", {key: value})
    assert "\n" not in str(err.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    with pytest.raises(UserError, match="invalid TOML"):
        build_config(str(bad), {})
    with pytest.raises(UserError, match="not found"):
        build_config(str(tmp_path / "missing.toml"), {})
    flat = tmp_path / "flat.toml"
    flat.write_text("steps = 3\n")
    with pytest.raises(UserError, match=r"must be a \[section\] table"):
        build_config(str(flat), {})


def test_round_trip_through_dict():
    cfg = build_config("configs/llama-8b.toml", {})
    assert config_from_dict(cfg.to_dict()) == cfg


def test_help_lists_every_key_with_default():
    text = help_text()
    for section in ("model", "data", "training", "optim", "checkpoint", "metrics"):
        assert f"[{section}]" in text
    assert "--training.steps" in text and "2000" in text
    assert Config().training.steps == 2000


def test_a_config_is_a_frozen_value_and_overrides_make_a_new_one():
    import dataclasses

    from clusterlm.config import Config, apply_overrides, settle_model
    from clusterlm.models.from_config import resolve_model_args

    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.steps = 5  # type: ignore[misc]
    changed = apply_overrides(cfg, {"training.steps": "5", "model.flavour": "llama"})
    assert (changed.training.steps, changed.model.flavour) == (5, "llama")
    assert (cfg.training.steps, cfg.model.flavour) == (2000, "gpt2")  # the original is untouched
    args = resolve_model_args(changed, 65)
    assert changed.model.vocab_size == 0 and changed.model.ffn_hidden == 0  # no side effects
    settled = settle_model(changed, 65).model
    assert (settled.vocab_size, settled.n_kv_head, settled.ffn_hidden) == (65, 4, args.ffn_hidden) == (65, 4, 512)


def test_help_lists_every_command_and_subcommand(capsys):
    from clusterlm.cli import COMMANDS, SUBCOMMANDS, main
    from clusterlm.cli.bench import MAINS

    assert set(MAINS) == set(SUBCOMMANDS["bench"])
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    assert all(f"{command} {sub} " in shown for command, subs in SUBCOMMANDS.items() for sub in subs)
