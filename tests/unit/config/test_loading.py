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
        "training.steps": "5",
        "optim.lr": "1e-3",
    }


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'training.steps'"):
        build_config(None, {"training.step": "5"})


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
    assert (
        (settled.vocab_size, settled.n_kv_head, settled.ffn_hidden)
        == (65, 4, args.ffn_hidden)
        == (65, 4, 512)
    )
