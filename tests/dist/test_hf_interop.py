"""Hugging Face weights across layouts, on real processes. Training from a tiny HF Llama
(`model.init_from`) under zero3 and tp2 equals one process at 1e-5 (see training.py); and `export
hf` of the checkpoint those ranks wrote in pieces (ZeRO-3 shards, tensor-parallel slices), reading
one tensor at a time, equals byte for byte the export of that checkpoint loaded whole."""

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

PRETRAINED = {"model__n_head": 4, "training__steps": 4}  # the tiny HF model has 4 heads (2 KV heads)


def tensors(directory) -> dict[str, bytes]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
    return out


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A tiny HF Llama on the corpus's tokenizer, and one process trained from it."""
    root = tmp_path_factory.mktemp("hf-llama")
    tokenizer = (data_dir / "tokenizer.json").read_text()
    tiny_hf_model(root, "llama", Tokenizer(tokenizer).vocab_size, tokenizer)
    single = run(data_dir, tmp_path_factory.mktemp("hf-single"), 1, model__init_from=f"hf:{root}",
                 training__micro_batch_size=2 * MICRO, **PRETRAINED)
    return root, single


def assert_export_equals_whole_export(run_dir, tmp_path):
    found = find_checkpoint(str(run_dir))
    saved = SafeFileSystemReader(found.path).read_metadata().state_dict_metadata
    assert any(len(meta.chunks) > 1 for key, meta in saved.items() if key.startswith("model."))  # in pieces
    export_checkpoint_hf(found, tmp_path / "sharded", max_shard_bytes=40_000)
    whole = load_for_inference(found, device="cpu").model.parts[0]
    export_hf(tmp_path / "whole", whole.args, reader(whole), (found.path / "tokenizer.json").read_text())
    exported = tensors(tmp_path / "sharded")
    assert exported and exported == tensors(tmp_path / "whole")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [  # the same global batch as the single process
    {"parallel__data_parallel": "zero3", "training__micro_batch_size": MICRO},
    {"parallel__tp": 2, "training__micro_batch_size": 2 * MICRO},
], ids=["zero3", "tp2"])
def test_train_from_pretrained_and_export_under_a_layout(layout, pretrained, data_dir, tmp_path):
    root, single = pretrained
    assert_equivalent(single, run(data_dir, tmp_path / "run", 2, model__init_from=f"hf:{root}", **PRETRAINED, **layout))
    assert_export_equals_whole_export(tmp_path / "run", tmp_path)
