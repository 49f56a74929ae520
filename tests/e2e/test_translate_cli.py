"""`clusterlm translate` as a user runs it: a tiny trained encoder-decoder translates the test
split's sources into exactly the translations `clusterlm eval` scores, greedy and by beam."""

from __future__ import annotations

import io
import re

import sacrebleu
from translation_pairs import TINY_TRANSLATION, prepare_pairs

from clusterlm.cli import main as cli
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import load_translation
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.train.trainer import train


def test_translate_gives_what_eval_scores(tmp_path, capsys, monkeypatch):
    task = prepare_pairs(tmp_path, count=200, separate_vocab=True)
    out = tmp_path / "out"
    values = {**TINY_TRANSLATION, "data.dir": str(task), "training.out_dir": str(out)}
    train(load_config(None, values))
    test = load_translation(str(task)).splits["test"]
    source = Tokenizer.load(task / "source_tokenizer.json")
    target = Tokenizer.load(task / "tokenizer.json")
    offset = load_translation(str(task)).manifest.target_offset
    lines = [source.decode(test.src[i].tolist()) for i in range(len(test))]
    truth = [target.decode((test.tgt[i][:-1] - offset).tolist()) for i in range(len(test))]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    for beam in ("1", "3"):
        capsys.readouterr()
        assert cli(["eval", "--run", str(out), "--split", "test", "--beam", beam]) == 0
        bleu, chrf = re.search(r"BLEU (\S+) chrF (\S+)", capsys.readouterr().out).groups()
        argv = ["translate", "--run", str(out), "--beam", beam, "--batch-size", "5"]
        assert cli([*argv, "--input", str(tmp_path / "in.txt")]) == 0
        texts = capsys.readouterr().out.splitlines()
        assert len(texts) == len(lines)
        assert f"{sacrebleu.corpus_bleu(texts, [truth]).score:.2f}" == bleu
        assert f"{sacrebleu.corpus_chrf(texts, [truth]).score:.2f}" == chrf
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines)))
        assert cli([*argv[:-1], "64", "--input", "-"]) == 0
        assert capsys.readouterr().out.splitlines() == texts  # batches of any size, stdin alike
    # A Hugging Face directory holds one tokenizer: a run with one per side is not exported.
    assert cli(["export", "hf", "--run", str(out), "--out", str(tmp_path / "hf")]) != 0
    assert "vocabulary per side" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
