"""A Hugging Face directory's ``model.safetensors.index.json`` names weight files beside it: a
name that is a path (``..``, absolute, a sub-directory) is refused with one line before any file
is opened."""

from __future__ import annotations

import json

import pytest
from hf_models import tiny_hf_model

from clusterlm.errors import UserError
from clusterlm.interop import hf_source


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors", "..", "", 7],
)
def test_an_index_naming_a_path_is_refused(tmp_path, name):
    root = tmp_path / "hf"
    tiny_hf_model(root, "gpt2", 40)
    (tmp_path / "outside.safetensors").write_bytes((root / "model.safetensors").read_bytes())
    (root / "model.safetensors").rename(root / "model-00001-of-00001.safetensors")
    weight_map = {
        "lm_head.weight": "model-00001-of-00001.safetensors",
        "transformer.wte.weight": name,
    }
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError) as caught:
        hf_source(root)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        f"{root / 'model.safetensors.index.json'} names the file {name!r}"
    )
    assert message.endswith("download or save the model again")


def test_an_index_without_a_weight_map_object_is_refused(tmp_path):
    root = tmp_path / "hf"
    tiny_hf_model(root, "gpt2", 40)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(UserError, match="has no weight_map object"):
        hf_source(root)
