"""Hugging Face in and out as a user runs it: prepare with a model's tokenizer, train from its
weights, export the result with `clusterlm export hf` and load it back in transformers (a Llama
decoder, and a bert encoder both ways)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hf_models import reader, safetensors_bytes, tiny_hf_model

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli import main as cli
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.interop import export_hf, hf_source
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.models.init import fill_parameters
from clusterlm.train.inference import load_for_inference
from clusterlm.train.session import build_session

WORDS = ["thou", "art", "the", "king", "of", "my", "heart", "and", "love", "doth", "speak"]
TRAIN = [
    "--training.micro_batch_size",
    "2",
    "--training.eval_batches",
    "1",
    "--training.log_interval",
    "1",
    "--optim.warmup_steps",
    "1",
    "--metrics.progress",
    "none",
    "--metrics.tensorboard",
    "false",
    "--metrics.plot",
    "false",
    "--training.steps",
    "2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-cli")
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(800)) + "\n"
    (root / "text.txt").write_text(text)
    tiny_hf_model(
        root / "llama", "llama", Tokenizer.char([text]).vocab_size, Tokenizer.char([text]).to_json()
    )
    data = root / "data"
    assert (
        cli(
            [
                "prepare",
                str(root / "text.txt"),
                "--out",
                str(data),
                "--tokenizer",
                f"hf:{root / 'llama'}",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return {"root": root, "hf": root / "llama", "data": data}


def test_training_starts_from_the_pretrained_weights(setup, tmp_path):
    cfg = load_config(
        None,
        {
            "model.init_from": f"hf:{setup['hf']}",
            "data.dir": str(setup["data"]),
            "training.out_dir": str(tmp_path),
            "model.block_size": 8,
        },
    )
    assert (cfg.model.flavour, cfg.model.n_layer, cfg.model.n_kv_head, cfg.model.block_size) == (
        "llama",
        2,
        2,
        8,
    )
    plain = build_session(cfg).model.parts[0]
    expected = type(plain)(plain.args)
    fill_parameters(expected, hf_source(setup["hf"]))
    for (name, param), reference in zip(
        plain.named_parameters(), expected.parameters(), strict=True
    ):
        assert torch.equal(param.detach(), reference.detach()), name


def test_train_then_export_loads_in_transformers(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = tmp_path / "run", tmp_path / "exported"
    assert (
        cli(
            [
                "train",
                "--model.init_from",
                f"hf:{setup['hf']}",
                "--data.dir",
                str(setup["data"]),
                "--training.out_dir",
                str(run),
                *TRAIN,
            ]
        )
        == 0
    )
    assert cli(["export", "hf", "--run", str(run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    ours = load_for_inference(find_checkpoint(str(run)), device="cpu").model.parts[0]
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("thou art")["input_ids"] == Tokenizer.load(
        f"hf:{setup['hf']}"
    ).encode("thou art")
    assert (
        cli(["export", "hf", "--run", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
        == 0
    )
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(half.float()(x).logits, ours(x), rtol=0.05, atol=0.05)
    before = sorted(p.name for p in out.iterdir())
    assert cli(["export", "hf", "--run", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_mismatches_get_one_line_and_write_nothing(setup, tmp_path, capsys):
    other = tmp_path / "other"
    (tmp_path / "other.txt").write_text(
        "a different corpus with other letters: xyzzy QUUX 123\n" * 50
    )
    assert cli(["prepare", str(tmp_path / "other.txt"), "--out", str(other), "--workers", "1"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    base = [
        "train",
        "--model.init_from",
        f"hf:{setup['hf']}",
        "--training.out_dir",
        str(run),
        *TRAIN,
    ]
    assert cli([*base, "--data.dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        "different tokenizer" in err and "prepare --tokenizer hf:" in err and err.count("\n") == 1
    )
    assert cli([*base, "--data.dir", str(setup["data"]), "--model.n_layer", "3"]) == 2
    err = capsys.readouterr().err
    assert "contradicts" in err and err.count("\n") == 1
    assert cli([*base, "--data.dir", str(setup["data"]), "--model.init_from", "gpt2"]) == 2
    assert "hf:DIR" in capsys.readouterr().err
    assert not run.exists()


BERT = [
    "--model.flavour",
    "bert",
    "--training.objective",
    "mlm",
    "--model.n_layer",
    "2",
    "--model.n_head",
    "4",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "16",
]


def test_bert_export_import_export_through_the_cli(setup, tmp_path, capsys):
    """An encoder trained with mlm exports to BertForMaskedLM; data prepared with the exported
    tokenizer trains an encoder started from the export, and exporting that start again gives the
    same bytes."""
    from transformers import BertForMaskedLM

    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "exported"
    assert (
        cli(["prepare", str(setup["root"] / "text.txt"), "--out", str(data), "--workers", "1"]) == 0
    )
    assert (
        cli(["train", *BERT, "--data.dir", str(data), "--training.out_dir", str(run), *TRAIN]) == 0
    )
    assert cli(["export", "hf", "--run", str(run), "--out", str(out)]) == 0
    ours = load_for_inference(find_checkpoint(str(run)), device="cpu").model.parts[0]
    x = torch.randint(
        0, ours.args.vocab_size + 4, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            BertForMaskedLM.from_pretrained(out).eval()(x).logits, ours(x), rtol=0, atol=1e-5
        )

    again = tmp_path / "again"
    assert (
        cli(
            [
                "prepare",
                str(setup["root"] / "text.txt"),
                "--out",
                str(again),
                "--workers",
                "1",
                "--tokenizer",
                f"hf:{out}",
            ]
        )
        == 0
    )
    cfg = load_config(
        None,
        {
            "model.init_from": f"hf:{out}",
            "data.dir": str(again),
            "training.objective": "mlm",
            "training.out_dir": str(tmp_path / "run2"),
        },
    )
    assert (cfg.model.flavour, cfg.model.vocab_size) == ("bert", ours.args.vocab_size)
    started = build_session(cfg).model.parts[0]
    export_hf(
        tmp_path / "round", started.args, reader(started), Tokenizer.load(f"hf:{out}").to_json()
    )
    assert safetensors_bytes(tmp_path / "round") == safetensors_bytes(out)
    capsys.readouterr()


def test_a_mixtral_trains_from_its_weights_and_exports_back(setup, tmp_path):
    """A mixture of experts through the CLI: trained from a MixtralForCausalLM (aux-loss
    balancing, so its routing stays Mixtral's), exported, loaded by transformers, equal logits."""
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.load(f"hf:{setup['hf']}")
    tiny_hf_model(tmp_path / "mixtral", "mixtral", tokenizer.vocab_size, tokenizer.to_json())
    run, out = tmp_path / "run", tmp_path / "exported"
    start = ["--model.init_from", f"hf:{tmp_path / 'mixtral'}", "--data.dir", str(setup["data"])]
    aux_loss = ["--model.moe_balance", "aux_loss"]
    assert cli(["train", *start, "--training.out_dir", str(run), *aux_loss, *TRAIN]) == 0
    assert cli(["export", "hf", "--run", str(run), "--out", str(out)]) == 0
    ours = load_for_inference(find_checkpoint(str(run)), device="cpu").model.parts[0]
    assert (ours.args.moe_experts, ours.args.moe_score) == (4, "softmax")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, ours.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=0, atol=1e-5)
