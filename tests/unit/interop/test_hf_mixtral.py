"""A mixture of experts in and out of Hugging Face as MixtralForCausalLM, against transformers
itself: logits equal at 1e-5 (fp32) both ways, experts read alone equal the same experts of the
whole, a round trip is byte-identical, and what Mixtral cannot express is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hf_models import reader, safetensors_bytes, tiny_hf_model
from test_hf_interop import TEXT, imported, one_line_error, tokens

from clusterlm.data.tokenizer import Tokenizer
from clusterlm.interop import export_hf, hf_model_config, hf_source
from clusterlm.models import ModelArgs, create_model, param_count
from clusterlm.models.moe import moe_blocks


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.char([TEXT])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("hf-mixtral")
    return root, tiny_hf_model(root, "mixtral", tokenizer.vocab_size, tokenizer.to_json())


def moe_args(vocab_size: int, **changes) -> ModelArgs:
    args = ModelArgs(
        flavour="llama",
        vocab_size=vocab_size,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        ffn_hidden=48,
        rope_theta=500.0,
        moe_experts=4,
        moe_top_k=2,
        moe_ffn_hidden=24,
        moe_score="softmax",
    )
    return dataclasses.replace(args, **changes)


def test_import_gives_the_logits_and_parameters_of_transformers(mixtral):
    root, reference = mixtral
    values = hf_model_config(root)
    assert (values["flavour"], values["moe_experts"], values["moe_top_k"]) == ("llama", 4, 2)
    assert (values["moe_score"], values["moe_norm_topk"], values["moe_shared_experts"]) == (
        "softmax",
        True,
        0,
    )
    model = imported(root)
    assert model.num_params() == param_count(model.args) == reference.num_parameters()
    x = tokens(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, rtol=0, atol=1e-5)


def test_experts_read_alone_equal_those_experts_of_the_whole(mixtral):
    root, _ = mixtral
    source, model = hf_source(root), imported(root)
    stacked = [name for name in dict(model.named_parameters()) if ".experts." in name]
    assert len(stacked) == 3 * 2
    for name in stacked:
        whole = dict(model.named_parameters())[name].detach()
        shape = tuple(whole.shape)
        no_expert = (slice(2, 2), slice(None), slice(None))
        for index in ((slice(1, 3), slice(5, 30), slice(2, 20)), no_expert):
            assert torch.equal(source(name, shape, index), whole[index]), (name, index)


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    args = moe_args(tokenizer.vocab_size)
    model = create_model(args).eval()
    written = export_hf(
        tmp_path / "out", args, reader(model), tokenizer.to_json(), max_shard_bytes=20_000
    )
    assert sum(name.endswith(".safetensors") for name in written) > 1
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(loaded).__name__ == "MixtralForCausalLM" and not any(info.values()), info
    x = tokens(args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model(x), rtol=0, atol=1e-5)


def test_round_trip_is_byte_identical(mixtral, tmp_path, tokenizer):
    root, _ = mixtral
    first = imported(root)
    export_hf(tmp_path / "a", first.args, reader(first), tokenizer.to_json())
    again = imported(tmp_path / "a")
    export_hf(tmp_path / "b", again.args, reader(again), tokenizer.to_json(), max_shard_bytes=9_000)
    assert (
        safetensors_bytes(tmp_path / "a")
        == safetensors_bytes(tmp_path / "b")
        == safetensors_bytes(root)
    )
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    sharded = dict(imported(tmp_path / "b").named_parameters())  # experts across shard files
    for name, param in again.named_parameters():
        assert torch.equal(sharded[name], param), name


def test_what_mixtral_cannot_express_is_refused_and_nothing_written(tmp_path, tokenizer):
    refusals = {
        "shared experts": {"moe_shared_experts": 1},
        "softmax": {"moe_score": "sigmoid"},
        "sum to 1": {"moe_norm_topk": False},
        "every Mixtral block": {"moe_layers": "after:1"},
    }
    for expected, change in refusals.items():
        args = moe_args(tokenizer.vocab_size, **change)
        message = one_line_error(
            lambda args=args: export_hf(tmp_path / "out", args, None, tokenizer.to_json())
        )
        assert expected in message and "MixtralForCausalLM" in message
    args = moe_args(tokenizer.vocab_size)
    model = create_model(args)
    moe_blocks(model)[1].router.expert_bias[2] = 0.01  # as aux-free balancing moves it
    message = one_line_error(lambda: export_hf(tmp_path / "out", args, reader(model), TEXT))
    assert "block 1's routing biases" in message and "aux_free" in message
    assert list(tmp_path.iterdir()) == []


def test_other_mixtures_of_experts_and_mixtral_options_get_one_line(mixtral, tmp_path):
    root, _ = mixtral
    config = json.loads((root / "config.json").read_text())
    for change, expected in (
        ({"model_type": "qwen3_moe"}, "MixtralForCausalLM"),
        ({"model_type": "deepseek_v3"}, "'deepseek_v3' is not supported"),
        ({"sliding_window": 8}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ):
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        assert expected in one_line_error(lambda: hf_model_config(tmp_path))


def test_a_slice_of_experts_reads_only_those_experts_tensors(mixtral, monkeypatch):
    """What a rank holding experts 1 and 2 (an FSDP or expert-parallel shard) reads from disk."""
    from clusterlm.interop import source as source_module

    root, _ = mixtral
    read = []
    original = source_module._HFWeights.read

    def recording(self, key, index, transpose):
        read.append(key)
        return original(self, key, index, transpose)

    monkeypatch.setattr(source_module._HFWeights, "read", recording)
    name, shape = "layers.1.mlp.experts.w2", (4, 24, 32)
    hf_source(root)(name, shape, (slice(1, 3), slice(None), slice(None)))
    assert read == [f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in (1, 2)]
