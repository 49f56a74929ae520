"""The encoder-decoder trains on a translation task in one process: the loss falls, and the
validation and test splits get loss, accuracy, BLEU and chrF. So does a decoder-only model on the
sequences ``source <eot> target <eot>``."""

import json

import pytest
from translation_pairs import MBART, prepare_pairs

from clusterlm.cli import main as cli
from clusterlm.data.translation import load_translation
from clusterlm.errors import UserError
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.train.trainer import train

SETTINGS = {
    **MBART, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 24,
    "training.micro_batch_size": 8, "training.steps": 24, "training.eval_interval": 24,
    "training.eval_batches": 1, "training.log_interval": 1, "optim.lr": 3e-3,
    "optim.warmup_steps": 3, "checkpoint.interval": 0, "metrics.progress": "none",
    "metrics.tensorboard": False, "metrics.plot": False, "training.precision": "fp32",
}  # fmt: skip


def test_separate_vocabularies_train_and_decode_target_text(tmp_path):
    task = prepare_pairs(tmp_path, separate_vocab=True)
    out = tmp_path / "out"
    values = {**SETTINGS, "training.steps": 4, "data.dir": str(task), "training.out_dir": str(out)}
    train(load_config(None, values))
    (test,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"test"' in line]  # fmt: skip
    assert 0 <= test["test_chrf"] <= 100


def test_training_lowers_the_loss_and_scores_translations(tmp_path, capsys):
    task = prepare_pairs(tmp_path)
    out = tmp_path / "out"
    train(load_config(None, {**SETTINGS, "data.dir": str(task), "training.out_dir": str(out)}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])
    (val,) = [r for r in records if r["kind"] == "eval"]
    (test,) = [r for r in records if r["kind"] == "test"]
    for record, split in ((val, "val"), (test, "test")):
        assert 0 <= record[f"{split}_accuracy"] <= 1 and record[f"{split}_loss"] > 0
        assert 0 <= record[f"{split}_bleu"] <= 100 and 0 <= record[f"{split}_chrf"] <= 100
    capsys.readouterr()
    assert cli(["eval", "--run", str(out), "--split", "test"]) == 0  # every test pair, again
    printed = capsys.readouterr().out
    assert f"BLEU {test['test_bleu']:.2f} chrF {test['test_chrf']:.2f}" in printed
    assert cli(["eval", "--run", str(out), "--split", "test", "--beam", "3"]) == 0
    assert "(beam 3, checkpoint step 24)" in capsys.readouterr().out
    # Sampling reads decoders only: it refuses the run with one line.
    assert cli(["generate", "--run", str(out), "--prompt", "the dog"]) != 0
    assert "encoder-decoder trained to translate" in capsys.readouterr().err


def test_a_decoder_only_model_learns_to_translate(tmp_path, capsys):
    task = prepare_pairs(tmp_path)
    out = tmp_path / "out"
    values = {**SETTINGS, "model.flavour": "gpt2", "model.block_size": 48, "model.n_embd": 64,
              "training.steps": 120, "training.log_interval": 10, "training.eval_interval": 0,
              "optim.lr": 1e-2, "data.dir": str(task), "training.out_dir": str(out)}  # fmt: skip
    train(load_config(None, values))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (test,) = [r for r in records if r["kind"] == "test"]
    assert test["test_chrf"] > 10  # Spanish words from English ones, from 120 steps
    capsys.readouterr()
    written = tmp_path / "test.es"
    argv = ["eval", "--run", str(out), "--split", "test", "--translations", str(written)]
    assert cli(argv) == 0  # greedy, every test pair, again: the same scores
    assert f"chrF {test['test_chrf']:.2f}" in capsys.readouterr().out
    texts = written.read_text().splitlines()
    references = [json.loads(line)["tgt"] for line in (tmp_path / "pairs.jsonl").open()]
    assert len(texts) == len(load_translation(str(task)).splits["test"])
    assert any(text in references for text in texts)  # some pairs wholly right
    assert cli(["eval", "--run", str(out), "--split", "test", "--beam", "2"]) == 0
    assert "chrF" in capsys.readouterr().out
    # translate takes encoder-decoder runs: it refuses this one with one line.
    assert cli(["translate", "--run", str(out), "--input", "-"]) != 0
    assert "decoder-only" in capsys.readouterr().err


def test_a_translation_task_needs_a_translation_model(tmp_path):
    task = prepare_pairs(tmp_path, count=30)
    bert = {"model.flavour": "bert", "training.objective": "mlm"}
    values = {**SETTINGS, **bert, "data.dir": str(task)}
    with pytest.raises(UserError, match="model.flavour = mbart"):
        train(load_config(None, {**values, "training.out_dir": str(tmp_path / "out")}))


def test_a_decoder_only_translation_model_refuses_model_parallel_layouts(tmp_path):
    task = prepare_pairs(tmp_path, count=30)
    values = {**SETTINGS, "model.flavour": "gpt2", "parallel.pp": 2, "data.dir": str(task)}
    with pytest.raises(UserError, match="data-parallel layouts only"):
        train(load_config(None, {**values, "training.out_dir": str(tmp_path / "out")}))
