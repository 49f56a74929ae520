"""Hugging Face weights across layouts. `export hf` from checkpoints that several ranks wrote in
pieces (ZeRO-3 shards, tensor-parallel slices), reading one tensor at a time, equals byte for byte
an export of the same checkpoint loaded whole into one process; and training from an HF model
(`model.init_from`) under zero3 and tp equals one process at 1e-5 (see training.py)."""

from __future__ import annotations

import pytest
from hf_models import reader, tiny_hf_model
from safetensors import safe_open

from clusterlm.data.tokenizer import Tokenizer
from clusterlm.interop import export_hf
from clusterlm.train.checkpoint import SafeFileSystemReader
from clusterlm.train.export import export_checkpoint_hf
from clusterlm.train.loading import find_checkpoint, load_for_inference

from .training import MICRO, assert_equivalent, run

LAYOUTS = {
    "zero3-llama": {"parallel__data_parallel": "zero3", "model__flavour": "llama", "model__n_kv_head": 1},
    "tp2-gpt2": {"parallel__tp": 2},
}


def tensors(directory) -> dict[str, bytes]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_of_a_sharded_checkpoint_equals_the_single_process_export(layout, data_dir, tmp_path):
    run(data_dir, tmp_path / "run", 2, training__steps=2, **LAYOUTS[layout])
    found = find_checkpoint(str(tmp_path / "run"))
    saved = SafeFileSystemReader(found.path).read_metadata().state_dict_metadata
    assert any(len(meta.chunks) > 1 for key, meta in saved.items() if key.startswith("model."))  # really in pieces
    export_checkpoint_hf(found, tmp_path / "sharded", max_shard_bytes=40_000)
    whole = load_for_inference(found, device="cpu").model.parts[0]
    tokenizer = (found.path / "tokenizer.json").read_text()
    export_hf(tmp_path / "whole", whole.args, reader(whole), tokenizer)
    exported = tensors(tmp_path / "sharded")
    assert exported and exported == tensors(tmp_path / "whole")


PRETRAINED = {"model__n_head": 4, "training__steps": 4}  # the tiny HF model has 4 heads (2 KV heads)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A tiny HF Llama on the corpus's tokenizer, and one process trained from it."""
    root = tmp_path_factory.mktemp("hf-llama")
    tokenizer = (data_dir / "tokenizer.json").read_text()
    tiny_hf_model(root, "llama", Tokenizer(tokenizer).vocab_size, tokenizer)
    single = run(data_dir, tmp_path_factory.mktemp("hf-single"), 1, model__init_from=f"hf:{root}",
                 training__micro_batch_size=2 * MICRO, **PRETRAINED)
    return root, single


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [  # the same global batch as the single process
    {"parallel__data_parallel": "zero3", "training__micro_batch_size": MICRO},
    {"parallel__tp": 2, "training__micro_batch_size": 2 * MICRO},
], ids=["zero3", "tp2"])
def test_training_from_pretrained_weights_equals_one_process(layout, pretrained, data_dir, tmp_path):
    root, single = pretrained
    assert_equivalent(single, run(data_dir, tmp_path, 2, model__init_from=f"hf:{root}", **PRETRAINED, **layout))
