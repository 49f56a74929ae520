"""Hugging Face import and export against transformers itself: logits equal at 1e-5 (fp32) both
ways, slices read alone equal the same slices of the whole tensor, a round trip is byte-identical,
and bad directories fail with one line and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import SIZES, reader, tiny_hf_model
from safetensors import safe_open
from safetensors.torch import save_file

from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError
from clusterlm.interop import export_hf, hf_model_config, hf_source
from clusterlm.models import ModelArgs, Transformer
from clusterlm.models.init import fill_parameters

FLAVOURS = ("gpt2", "llama")
TEXT = "to be or not to be, that is the question"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.char([TEXT])


@pytest.fixture(scope="module", params=FLAVOURS)
def hf_dir(request, tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    return root, tiny_hf_model(root, request.param, tokenizer.vocab_size, tokenizer.to_json())


def imported(directory: Path) -> Transformer:
    model = Transformer(ModelArgs(**hf_model_config(directory)))
    fill_parameters(model, hf_source(directory))
    return model.eval()


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SIZES["context"]), generator=torch.Generator().manual_seed(1))


def safetensors_bytes(directory: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
    return out


def test_import_gives_the_logits_of_transformers(hf_dir):
    root, reference = hf_dir
    x = tokens(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(imported(root)(x), reference(x).logits, rtol=0, atol=1e-5)


def test_original_gpt2_names_tied_llama_and_a_shorter_context(tmp_path, tokenizer):
    gpt2 = tiny_hf_model(tmp_path / "gpt2", "gpt2", tokenizer.vocab_size)
    with safe_open(str(tmp_path / "gpt2" / "model.safetensors"), "pt") as f:  # GPT2Model names, as uploaded
        stripped = {key.removeprefix("transformer."): f.get_tensor(key) for key in f.keys()}
    save_file(stripped, str(tmp_path / "gpt2" / "model.safetensors"))
    tied = tiny_hf_model(tmp_path / "tied", "llama", tokenizer.vocab_size, tie_word_embeddings=True)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    x = tokens(tokenizer.vocab_size)
    for directory, reference in ((tmp_path / "gpt2", gpt2), (tmp_path / "tied", tied)):
        with torch.no_grad():
            torch.testing.assert_close(imported(directory)(x), reference(x).logits, rtol=0, atol=1e-5)
    short = Transformer(ModelArgs(**hf_model_config(tmp_path / "gpt2") | {"block_size": 8}))
    fill_parameters(short, hf_source(tmp_path / "gpt2"))  # the first 8 learned positions
    with torch.no_grad():
        torch.testing.assert_close(short.eval()(x[:, :8]), gpt2(x[:, :8]).logits, rtol=0, atol=1e-5)


def test_a_slice_read_alone_equals_that_slice_of_the_whole(hf_dir):
    root, _ = hf_dir
    source, model = hf_source(root), imported(root)
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        # odd bounds: rows that cut heads (and q/k/v bands) in the middle, columns of a Conv1D
        index = tuple(slice(n // 3, n - n // 5) for n in shape)
        assert torch.equal(source(name, shape, index), param.detach()[index]), name


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for flavour in FLAVOURS:
        torch.manual_seed(3)
        args = ModelArgs(flavour=flavour, vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=4,
                         n_kv_head=2 if flavour == "llama" else 4, n_embd=32, ffn_hidden=48, rope_theta=500.0)
        model = Transformer(args).eval()
        export_hf(tmp_path / flavour, args, reader(model), tokenizer.to_json())
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / flavour).eval()
        assert type(loaded).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[flavour]
        x = tokens(args.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x), rtol=0, atol=1e-5)
        hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / flavour)
        assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)


def test_round_trip_is_byte_identical(hf_dir, tmp_path, tokenizer):
    root, _ = hf_dir
    first = imported(root)
    export_hf(tmp_path / "a", first.args, reader(first), tokenizer.to_json())
    export_hf(tmp_path / "b", first.args, reader(imported(tmp_path / "a")), tokenizer.to_json(),
              max_shard_bytes=20_000)  # sharded this time, with an index
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert safetensors_bytes(tmp_path / "a") == safetensors_bytes(tmp_path / "b") == safetensors_bytes(root)


def test_a_sharded_export_loads_in_transformers(hf_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    root, reference = hf_dir
    model = imported(root)
    written = export_hf(tmp_path / "out", model.args, reader(model), tokenizer.to_json(),
                        max_shard_bytes=30_000)
    assert sum(name.endswith(".safetensors") for name in written) > 1
    x = tokens(model.args.vocab_size)
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=0, atol=1e-5)


def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_directories_get_one_line(tmp_path, hf_dir):
    root, _ = hf_dir
    assert "does not exist" in one_line_error(lambda: hf_source(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(lambda: hf_source(tmp_path / "empty"))

    def variant(name: str, change) -> Path:
        copy = tmp_path / name
        copy.mkdir()
        for path in root.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
        change(copy)
        return copy

    def set_config(**values):
        return lambda d: (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | values))

    bert = variant("bert", set_config(model_type="bert"))
    assert "not supported" in one_line_error(lambda: hf_source(bert))
    relu = variant("relu", set_config(activation_function="relu", hidden_act="relu"))
    assert "not supported" in one_line_error(lambda: hf_source(relu))
    pickled = variant("pickled", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
    assert "safe_serialization=True" in one_line_error(lambda: hf_source(pickled))
    half = variant("half", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]))
    assert "half-written" in one_line_error(lambda: hf_source(half))
    index = {"weight_map": {"x": "model-00002-of-00002.safetensors"}}
    unindexed = variant("unindexed", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(index)))
    assert "missing" in one_line_error(lambda: hf_source(unindexed))


def test_shape_and_dtype_surprises_get_one_line(tmp_path, hf_dir):
    root, _ = hf_dir
    source = hf_source(root)
    name, shape = "tok_embeddings.weight", (7, 32)
    assert "shape" in one_line_error(lambda: source(name, shape, tuple(slice(0, n) for n in shape)))
    ints = tmp_path / "ints"
    ints.mkdir()
    (ints / "config.json").write_bytes((root / "config.json").read_bytes())
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        save_file({key: f.get_tensor(key).to(torch.int32) for key in f.keys()}, str(ints / "model.safetensors"))
    assert "not a floating-point" in one_line_error(lambda: hf_source(ints))
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_bytes((root / "config.json").read_bytes())
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        save_file({key: f.get_tensor(key)[..., :8].contiguous() for key in f.keys()}, str(narrow / "model.safetensors"))
    assert "different models" in one_line_error(lambda: hf_source(narrow))


def test_export_refuses_a_non_empty_directory_and_writes_nothing(tmp_path, tokenizer):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ModelArgs(vocab_size=tokenizer.vocab_size)
    assert "not empty" in one_line_error(lambda: export_hf(out, args, None, tokenizer.to_json()))
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and [p.name for p in out.iterdir()] == ["keep.txt"]
