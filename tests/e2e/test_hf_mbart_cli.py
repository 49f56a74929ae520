"""The encoder-decoder through Hugging Face: `clusterlm export hf` of a trained translation run
loads as transformers' MBartForConditionalGeneration with the same logits at 1e-5, and its
`generate` with the same beam settings gives the same tokens; importing the directory back
gives the same logits and a byte-identical export. The model has a deeper encoder than decoder
(mBART's encoder_layers and decoder_layers), so each side's depth travels on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from translation_pairs import TINY_TRANSLATION, prepare_pairs

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli import main as cli
from clusterlm.data.pair_batches import PairStream
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import load_translation
from clusterlm.interop import export_hf, hf_model_config, hf_source
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.models import ModelArgs, create_model
from clusterlm.models.init import fill_parameters
from clusterlm.train.decoding import beam_decode
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module, PairStream]:
    root = tmp_path_factory.mktemp("mbart")
    task = prepare_pairs(root, count=200)
    out = root / "out"
    depths = {"model.n_layer": 2, "model.decoder_layers": 1}
    values = {**TINY_TRANSLATION, **depths, "training.steps": 80, "training.out_dir": str(out)}
    train(load_config(None, {**values, "data.dir": str(task)}))  # sensible translations
    assert cli(["export", "hf", "--run", str(out), "--out", str(root / "hf")]) == 0
    ours = load_for_inference(find_checkpoint(str(out))).model.parts[0]
    loaded = load_translation(str(task))
    stream = PairStream(loaded.splits["test"], loaded.manifest.eot_id)
    return root / "hf", task, ours, stream


def test_transformers_gives_our_logits(exported):
    hf_dir, _, ours, stream = exported
    theirs = transformers.MBartForConditionalGeneration.from_pretrained(hf_dir).eval()
    x, _ = stream.batch(list(range(6)), 24, torch.device("cpu"))
    source, target = x[:, :24], x[:, 24:]
    with torch.no_grad():
        logits = theirs(
            input_ids=source.clamp(min=0), attention_mask=(source >= 0).long(),
            decoder_input_ids=target.clamp(min=0),
        ).logits  # fmt: skip
        torch.testing.assert_close(ours(x), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("beam", "penalty", "max_len"), [(1, 1.0, 24), (3, 0.8, 24), (4, 1.5, 6)])
def test_generate_gives_our_beam_search(exported, beam, penalty, max_len):
    hf_dir, _, ours, stream = exported
    theirs = transformers.MBartForConditionalGeneration.from_pretrained(hf_dir).eval()
    x, _ = stream.batch(list(range(len(stream.split))), 24, torch.device("cpu"))
    source, eot = x[:, :24], stream.eot_id
    found = beam_decode(ours, source, eot, max_len, beam, penalty)
    generated = theirs.generate(
        input_ids=source.clamp(min=0), attention_mask=(source >= 0).long(), num_beams=beam,
        length_penalty=penalty, early_stopping=True, max_new_tokens=max_len, do_sample=False,
        decoder_start_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )  # fmt: skip
    assert found.ne(-1).any(1).all()  # translations, not empty lines
    for row, tokens in zip(found, generated[:, 1:], strict=True):
        ends = (tokens == eot).nonzero()
        mine = tokens[: int(ends[0]) if len(ends) else len(tokens)]
        assert row[row >= 0].tolist() == mine.tolist()


def test_import_gives_the_same_logits_and_a_byte_identical_export(exported, tmp_path):
    hf_dir, task, ours, stream = exported
    imported = create_model(ModelArgs(**hf_model_config(hf_dir)))
    fill_parameters(imported, hf_source(hf_dir))
    x, _ = stream.batch(list(range(6)), 24, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(imported.eval()(x), ours(x), rtol=0, atol=1e-5)
    params = dict(imported.named_parameters())
    tokenizer = Tokenizer.load(task / "tokenizer.json").to_json()
    export_hf(tmp_path / "again", imported.args, params.__getitem__, tokenizer)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (hf_dir / name).read_bytes()
    # model.init_from = hf:DIR adopts the shape and trains from these weights.
    values = {**TINY_TRANSLATION, "training.steps": 1, "training.out_dir": str(tmp_path / "ft")}
    del values["model.n_layer"]
    cfg = load_config(None, {**values, "data.dir": str(task), "model.init_from": f"hf:{hf_dir}"})
    shape = (cfg.model.flavour, cfg.model.n_embd, cfg.model.n_layer, cfg.model.decoder_layers)
    assert shape == ("mbart", 32, 2, 1)
    train(cfg)
    assert (tmp_path / "ft" / "checkpoints").is_dir()
