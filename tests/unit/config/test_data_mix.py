"""data.mix: the DIR=WEIGHT text, the TOML array form, and the mixes refused."""

import pytest

from clusterlm.config import build_config, config_from_dict
from clusterlm.config.data_mix import MixSource, parse_mix
from clusterlm.errors import UserError


def test_text_and_toml_array_give_the_same_sources(tmp_path):
    toml = tmp_path / "mix.toml"
    toml.write_text('[data]\nmix = [{dir = "s3://b/a=1", weight = 0.7}, {dir = "b", weight = 3}]\n')
    from_toml = build_config(str(toml), {})
    from_cli = build_config(None, {"data.mix": "s3://b/a=1=0.7, b=3"})
    expected = (MixSource("s3://b/a=1", 0.7), MixSource("b", 3.0))
    assert from_toml.data.sources == from_cli.data.sources == expected
    # Saved in a checkpoint's config and read back, the mix is the same.
    assert config_from_dict(from_toml.to_dict()).data.sources == expected


def test_without_a_mix_the_source_is_data_dir():
    cfg = build_config(None, {"data.dir": "data/x"})
    assert cfg.data.sources == (MixSource("data/x", 1.0),)


@pytest.mark.parametrize(
    "mix, message",
    [
        ("a=0.5,b=0", "must be a positive number"),
        ("a=0.5,b=-1", "must be a positive number"),
        ("a=nan", "must be a positive number"),
        ("a=inf", "must be a positive number"),
        ("a=heavy", "is not a number"),
        ("a", "has no DIR=WEIGHT"),
        ("a=1,", "has no DIR=WEIGHT"),
        ("=1", "has no DIR=WEIGHT"),
        ("a=1,a=2", "names a twice"),
    ],
)
def test_bad_mixes_are_one_line(mix, message):
    with pytest.raises(UserError, match=message):
        build_config(None, {"data.mix": mix})


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", "empty list"),
        ('[{dir = "a"}]', "must be a table with dir and weight"),
        ('[{dir = "a", weight = "1"}]', "must be a number"),
        ('[{dir = "a", weight = 0}]', "must be a positive number"),
        ('[{dir = "a,b", weight = 1}]', "without commas"),
        ("[1, 2]", "must be a table"),
    ],
)
def test_bad_toml_mixes_are_one_line(tmp_path, value, message):
    toml = tmp_path / "mix.toml"
    toml.write_text(f"[data]\nmix = {value}\n")
    with pytest.raises(UserError, match=message):
        build_config(str(toml), {})


def test_other_keys_still_refuse_arrays(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[data]\ndir = ["a"]\n')
    with pytest.raises(UserError, match="data.dir must be a string"):
        build_config(str(toml), {})
    assert parse_mix("") == ()


def test_a_translation_model_does_not_mix():
    with pytest.raises(UserError, match="drop data.mix"):
        build_config(None, {"data.mix": "a=1,b=1", "model.flavour": "mbart"})
