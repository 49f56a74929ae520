"""Hugging Face weights across layouts, on real processes. A meta model materialized from an HF
directory under tp (GPT-2's fused, transposed and tied tensors, cut by heads and vocabulary),
pp (Llama's permuted rows), zero3 and tp (a BertForMaskedLM) and zero3 (a MixtralForCausalLM's
experts) holds exactly the HF weights, each rank asking only for its shards. Training from
an HF Llama (`model.init_from`) under zero3 equals one process at 1e-5 (see training.py), and
`export hf` of the checkpoint those ranks wrote in pieces, reading one tensor at a time, equals
byte for byte the export of that checkpoint loaded whole."""

from __future__ import annotations

import pytest
import torch
from hf_models import reader, tiny_hf_model
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from clusterlm.interop.pretrained_shape import load_config
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.interop import export_hf, hf_model_config, hf_source
from clusterlm.models import ModelArgs, create_model
from clusterlm.models.init import fill_parameters
from clusterlm.parallel import parallelize
from clusterlm.parallel.materialize import canonical_name
from clusterlm.checkpoint.tensor_storage import SafeFileSystemReader
from clusterlm.train.export_checkpoint import export_checkpoint_hf
from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.train.inference import load_for_inference
from clusterlm.distributed.runtime import setup_runtime
from clusterlm.train.session import build_model

from .helpers import run_distributed
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
def test_train_from_pretrained_under_zero3_and_export(pretrained, data_dir, tmp_path):
    root, single = pretrained
    zero3 = {"parallel__data_parallel": "zero3", "training__micro_batch_size": MICRO}  # single's global batch
    assert_equivalent(single, run(data_dir, tmp_path / "run", 2, model__init_from=f"hf:{root}", **PRETRAINED, **zero3))
    assert_export_equals_whole_export(tmp_path / "run", tmp_path)


def _materialize_from(rank: int, world_size: int, values: dict, directory: str) -> tuple[dict, int]:
    """This rank's parameters as whole tensors, and how many values it asked the source for."""
    cfg = load_config(None, {**values, "training.precision": "fp32"})
    runtime = setup_runtime(cfg)
    plain, _ = build_model(cfg, cfg.model.vocab_size)
    asked = [0]
    source = hf_source(directory)

    def counting(name, shape, index):
        values = source(name, shape, index)
        asked[0] += values.numel()
        return values

    model = parallelize(plain, cfg, runtime.mesh, runtime.device, counting)
    whole = {}
    for part in model.parts:
        for name, param in part.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            whole[canonical_name(name, plain.args.tie_embeddings)] = full.detach().clone()
    return whole, asked[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flavour,world_size,layout", [
    ("gpt2", 2, {"parallel.tp": 2}),
    ("llama", 2, {"parallel.pp": 2, "training.micro_batch_size": 4}),
    ("bert", 2, {"parallel.data_parallel": "zero3", "training.objective": "mlm"}),
    ("bert", 2, {"parallel.tp": 2, "training.objective": "mlm"}),
    ("mixtral", 2, {"parallel.data_parallel": "zero3"}),  # each rank reads its experts
], ids=["gpt2-tp2", "llama-pp2", "bert-zero3", "bert-tp2", "mixtral-zero3"])
def test_each_rank_materializes_its_shards_of_the_hf_weights(flavour, world_size, layout, tmp_path):
    tokenizer = Tokenizer.char(["abcdefghijklmnopqrstuvwxyz ,.!?"])
    tiny_hf_model(tmp_path, flavour, tokenizer.vocab_size)
    values = {"model.init_from": f"hf:{tmp_path}", "training.seq_len": 8, **layout}
    ranks = run_distributed(_materialize_from, world_size, values, str(tmp_path), timeout=240)
    expected = create_model(ModelArgs(**hf_model_config(tmp_path)))
    fill_parameters(expected, hf_source(tmp_path))
    reference = dict(expected.named_parameters())
    total = sum(p.numel() for p in reference.values())
    for whole, asked in ranks:
        assert asked < total  # its shards, not the model
        for name, tensor in whole.items():
            assert torch.equal(tensor, reference[name].detach()), name
    assert set().union(*(whole for whole, _ in ranks)) == set(reference)
