"""Hugging Face import and export against transformers itself: logits equal at 1e-5 (fp32) both
ways (bert with padding and token types too), slices read alone equal the same slices of the whole
tensor, a round trip is byte-identical, and bad directories fail with one line and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import SIZES, reader, safetensors_bytes, tiny_hf_model
from safetensors import safe_open
from safetensors.torch import save_file

from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError
from clusterlm.interop import export_hf, hf_model_config, hf_source
from clusterlm.models import ModelArgs, create_model, param_count
from clusterlm.models.counting import matmul_params
from clusterlm.models.init import fill_parameters

FLAVOURS = ("gpt2", "llama", "bert")
TEXT = "to be or not to be, that is the question"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.char([TEXT])


@pytest.fixture(scope="module", params=FLAVOURS)
def hf_dir(request, tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    return root, tiny_hf_model(root, request.param, tokenizer.vocab_size, tokenizer.to_json())


def imported(directory: Path) -> torch.nn.Module:
    model = create_model(ModelArgs(**hf_model_config(directory)))
    fill_parameters(model, hf_source(directory))
    return model.eval()


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(
        0, vocab_size, (2, SIZES["context"]), generator=torch.Generator().manual_seed(1)
    )


def test_import_gives_the_logits_of_transformers(hf_dir):
    root, reference = hf_dir
    x = tokens(reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(imported(root)(x), reference(x).logits, rtol=0, atol=1e-5)


def test_original_gpt2_names_tied_llama_and_a_shorter_context(tmp_path, tokenizer):
    gpt2 = tiny_hf_model(tmp_path / "gpt2", "gpt2", tokenizer.vocab_size)
    with safe_open(
        str(tmp_path / "gpt2" / "model.safetensors"), "pt"
    ) as f:  # GPT2Model names, as uploaded
        stripped = {key.removeprefix("transformer."): f.get_tensor(key) for key in f.keys()}
    save_file(stripped, str(tmp_path / "gpt2" / "model.safetensors"))
    tied = tiny_hf_model(tmp_path / "tied", "llama", tokenizer.vocab_size, tie_word_embeddings=True)
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    x = tokens(tokenizer.vocab_size)
    for directory, reference in ((tmp_path / "gpt2", gpt2), (tmp_path / "tied", tied)):
        with torch.no_grad():
            torch.testing.assert_close(
                imported(directory)(x), reference(x).logits, rtol=0, atol=1e-5
            )
    short = create_model(ModelArgs(**hf_model_config(tmp_path / "gpt2") | {"block_size": 8}))
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


def auto_class(flavour: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if flavour == "bert" else AutoModelForCausalLM


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for flavour in ("gpt2", "llama"):
        torch.manual_seed(3)
        args = ModelArgs(
            flavour=flavour,
            vocab_size=tokenizer.vocab_size,
            block_size=16,
            n_layer=2,
            n_head=4,
            n_kv_head=2 if flavour == "llama" else 4,
            n_embd=32,
            ffn_hidden=48,
            rope_theta=500.0,
        )
        model = create_model(args).eval()
        export_hf(tmp_path / flavour, args, reader(model), tokenizer.to_json())
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / flavour).eval()
        assert (
            type(loaded).__name__
            == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[flavour]
        )
        x = tokens(args.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x), rtol=0, atol=1e-5)
        hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / flavour)
        assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)


def with_random_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Norms start at one and biases at zero; make them matter for the comparisons."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def test_bert_exports_to_bert_for_masked_lm_with_equal_logits_and_counts(tmp_path, tokenizer):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    torch.manual_seed(3)
    args = ModelArgs(
        flavour="bert",
        vocab_size=tokenizer.vocab_size,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        n_embd=32,
        ffn_hidden=48,
        norm_eps=1e-6,
    )
    model = with_random_vectors(create_model(args))
    export_hf(tmp_path / "bert", args, reader(model), tokenizer.to_json())
    loaded, info = BertForMaskedLM.from_pretrained(tmp_path / "bert", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "bert")) is BertForMaskedLM
    config, specials = loaded.config, [args.vocab_size + i for i in range(4)]
    assert (
        config.vocab_size,
        config.pad_token_id,
        config.hidden_act,
        config.layer_norm_eps,
        config.max_position_embeddings,
        config.type_vocab_size,
    ) == (args.vocab_size + 4, specials[3], "gelu", 1e-6, 16, 2)
    x = tokens(args.vocab_size + 4)  # the special tokens too
    types = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(2))
    real = torch.ones(x.shape, dtype=torch.bool)
    real[1, 11:] = False  # the second sequence is padded
    with torch.no_grad():
        loaded.eval()
        torch.testing.assert_close(loaded(x).logits, model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            loaded(x, attention_mask=real.long(), token_type_ids=types).logits,
            model(x, types, real),
            rtol=0,
            atol=1e-5,
        )
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert [
        hf_tokenizer.mask_token_id,
        hf_tokenizer.cls_token_id,
        hf_tokenizer.sep_token_id,
        hf_tokenizer.pad_token_id,
    ] == specials
    assert hf_tokenizer("[MASK] be")["input_ids"][0] == specials[0]
    assert (
        Tokenizer.load(f"hf:{tmp_path / 'bert'}").vocab_size == args.vocab_size
    )  # prepare sees the encoder's vocab
    # exact counts: parameters, and the 6N rule's N (HF leaves out every table; the tied one is our
    # head)
    assert param_count(args) == loaded.num_parameters() == model.num_params()
    assert (
        matmul_params(args)
        == loaded.num_parameters(exclude_embeddings=True) + (args.vocab_size + 4) * 32
    )
    wider = ModelArgs(
        **{**vars(args), "vocab_size": args.vocab_size + 1}
    )  # specials would land off their rows
    assert "cannot hold [MASK]" in one_line_error(
        lambda: export_hf(tmp_path / "wider", wider, None, tokenizer.to_json())
    )
    assert not (tmp_path / "wider").exists()


def test_bert_directories_we_cannot_represent_get_one_line(tmp_path, tokenizer):
    root = tmp_path / "bert"
    tiny_hf_model(root, "bert", tokenizer.vocab_size)
    config = json.loads((root / "config.json").read_text())
    refusals = {
        "pre-norm": {"model_type": "megatron-bert"},
        "position_embedding_type": {"position_embedding_type": "relative_key"},
        "reserves the last four ids": {"pad_token_id": 0},
        "no masked-LM head": {"architectures": ["BertModel"]},
        "type_vocab_size": {"type_vocab_size": 3},
        "hidden_act": {"hidden_act": "gelu_new"},
    }
    for expected, change in refusals.items():
        (root / "config.json").write_text(json.dumps(config | change))
        assert expected in one_line_error(lambda: hf_model_config(root))


def test_round_trip_is_byte_identical(hf_dir, tmp_path, tokenizer):
    root, _ = hf_dir
    first = imported(root)
    export_hf(tmp_path / "a", first.args, reader(first), tokenizer.to_json())
    export_hf(
        tmp_path / "b",
        first.args,
        reader(imported(tmp_path / "a")),
        tokenizer.to_json(),
        max_shard_bytes=20_000,
    )  # sharded this time, with an index
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert (
        safetensors_bytes(tmp_path / "a")
        == safetensors_bytes(tmp_path / "b")
        == safetensors_bytes(root)
    )


def test_a_sharded_export_loads_in_transformers(hf_dir, tmp_path, tokenizer):
    root, reference = hf_dir
    model = imported(root)
    written = export_hf(
        tmp_path / "out", model.args, reader(model), tokenizer.to_json(), max_shard_bytes=30_000
    )
    assert sum(name.endswith(".safetensors") for name in written) > 1
    x = tokens(model.args.vocab_size)
    with torch.no_grad():
        loaded = auto_class(model.args.flavour).from_pretrained(tmp_path / "out").eval()
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
        return lambda d: (d / "config.json").write_text(
            json.dumps(json.loads((d / "config.json").read_text()) | values)
        )

    t5 = variant("t5", set_config(model_type="t5"))
    assert "not supported" in one_line_error(lambda: hf_source(t5))
    relu = variant("relu", set_config(activation_function="relu", hidden_act="relu"))
    assert "not supported" in one_line_error(lambda: hf_source(relu))
    pickled = variant(
        "pickled", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")
    )
    assert "safe_serialization=True" in one_line_error(lambda: hf_source(pickled))
    half = variant(
        "half",
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:1000]
        ),
    )
    assert "half-written" in one_line_error(lambda: hf_source(half))
    index = {"weight_map": {"x": "model-00002-of-00002.safetensors"}}
    unindexed = variant(
        "unindexed", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(index))
    )
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
        save_file(
            {key: f.get_tensor(key).to(torch.int32) for key in f.keys()},
            str(ints / "model.safetensors"),
        )
    assert "not a floating-point" in one_line_error(lambda: hf_source(ints))
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_bytes((root / "config.json").read_bytes())
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        save_file(
            {key: f.get_tensor(key)[..., :8].contiguous() for key in f.keys()},
            str(narrow / "model.safetensors"),
        )
    assert "different models" in one_line_error(lambda: hf_source(narrow))


def test_export_refuses_a_non_empty_directory_and_writes_nothing(tmp_path, tokenizer):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ModelArgs(vocab_size=tokenizer.vocab_size)
    assert "not empty" in one_line_error(lambda: export_hf(out, args, None, tokenizer.to_json()))
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and [
        p.name for p in out.iterdir()
    ] == ["keep.txt"]
