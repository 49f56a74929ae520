"""Translation tasks: prepared from JSONL pairs and from the real Bible modules, read back."""

import json

import numpy as np
import pytest
from sword_modules import require_bible

from clusterlm.data.task_prepare import BIBLE_TASK, TaskOptions
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import is_translation_dir, load_translation
from clusterlm.data.translation_prepare import prepare_translation
from clusterlm.errors import UserError

PAIRS = [
    ("the house", "la casa", "train"),
    ("the dog", "el perro", "train"),
    ("a big house", "una casa grande", "train"),
    ("the cat", "el gato", "val"),
    ("the big dog", "el perro grande", "test"),
]


def write_pairs(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return f"translation-jsonl:{path}"


def test_jsonl_pairs_round_trip_with_their_splits(tmp_path):
    rows = [{"src": s, "tgt": t, "split": split} for s, t, split in PAIRS]
    out = tmp_path / "out"
    manifest = prepare_translation(TaskOptions(write_pairs(tmp_path / "p.jsonl", rows), str(out)))
    assert is_translation_dir(str(out)) and manifest.split_rule == "given"
    task = load_translation(str(out))
    tokenizer = Tokenizer((out / "tokenizer.json").read_text())
    assert [len(task.splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    val = task.splits["val"]
    assert tokenizer.decode(val.src[0]) == "the cat"
    assert tokenizer.decode(val.tgt[0][:-1]) == "el gato" and val.tgt[0][-1] == manifest.eot_id


def test_char_vocabulary_comes_from_training_pairs_only(tmp_path, capsys):
    rows = [{"src": s, "tgt": t, "split": split} for s, t, split in PAIRS]
    rows.append({"src": "zzz", "tgt": "zzz", "split": "val"})  # 'z' is in no training pair
    out = tmp_path / "out"
    manifest = prepare_translation(TaskOptions(write_pairs(tmp_path / "p.jsonl", rows), str(out)))
    assert manifest.splits["val"].pairs == 1
    assert "unseen in training" in next(iter(manifest.dropped.values()))
    assert "1 val pairs" in capsys.readouterr().out


def test_an_identical_rerun_does_nothing(tmp_path, capsys):
    rows = [{"src": s, "tgt": t} for s, t, _ in PAIRS * 4]
    task = write_pairs(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    prepare_translation(TaskOptions(task, str(out), val_fraction=0.2, test_fraction=0.2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_translation(TaskOptions(task, str(out), val_fraction=0.2, test_fraction=0.2))
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "row, message",
    [({"src": "a"}, 'no "tgt"'), ({"tgt": "a"}, 'no "src"'), ({"src": "", "tgt": "a"}, '"src"')],
)
def test_a_pair_without_both_sides_is_refused(tmp_path, row, message):
    task = write_pairs(tmp_path / "p.jsonl", [row])
    with pytest.raises(UserError, match=message):
        prepare_translation(TaskOptions(task, str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_an_empty_split_is_refused(tmp_path):
    rows = [{"src": s, "tgt": t, "split": "train"} for s, t, _ in PAIRS]
    with pytest.raises(UserError, match="the val split .* is empty"):
        prepare_translation(
            TaskOptions(write_pairs(tmp_path / "p.jsonl", rows), str(tmp_path / "o"))
        )
    assert not (tmp_path / "o").exists()


def test_the_bible_is_split_by_book(tmp_path):
    require_bible()
    out = tmp_path / "bible"
    manifest = prepare_translation(TaskOptions(BIBLE_TASK, str(out), tokenizer="bpe"))
    assert manifest.split_rule == "book" and "Jonah.1" in manifest.dropped
    task = load_translation(str(out))
    tokenizer = Tokenizer((out / "tokenizer.json").read_text())
    ruth_1_1 = tokenizer.decode(task.splits["test"].tgt[0][:-1])  # Ruth comes before John
    assert ruth_1_1.startswith("Y ACONTECIÓ en los días que gobernaban los jueces")
    assert 28_000 < manifest.splits["train"].pairs and np.all(task.splits["train"].tgt[0] >= 0)


def test_two_text_files_pair_their_lines(tmp_path):
    english = [s for s, _, _ in PAIRS] * 4 + ["", "lost"]
    spanish = [t for _, t, _ in PAIRS] * 4 + ["perdido", ""]
    (tmp_path / "en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    (tmp_path / "es.txt").write_text("\n".join(spanish) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    task = f"translation-text:{tmp_path / 'en.txt'},{tmp_path / 'es.txt'}"
    manifest = prepare_translation(TaskOptions(task, str(out), test_fraction=0.2))
    assert sum(s.pairs for s in manifest.splits.values()) == 20  # two pairs had an empty side
    assert manifest.dropped == {"2 lines": "an empty side"}
    loaded = load_translation(str(out))
    tokenizer = Tokenizer((out / "tokenizer.json").read_text())
    src, tgt = loaded.splits["train"].src[0], loaded.splits["train"].tgt[0][:-1]
    assert dict(zip(english, spanish, strict=True))[tokenizer.decode(src)] == tokenizer.decode(tgt)


def test_sides_of_different_lengths_are_refused(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "es.txt").write_text("a\nb\n", encoding="utf-8")
    task = f"translation-text:{tmp_path / 'en.txt'},{tmp_path / 'es.txt'}"
    with pytest.raises(UserError, match="has 3 lines but .* has 2"):
        prepare_translation(TaskOptions(task, str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_separate_vocabularies_follow_each_other_in_one_id_space(tmp_path):
    # Each side's held-out characters occur in that side's training text.
    pairs = [*PAIRS[:3], ("the dog house", "la casa perro", "val"), ("a dog", "el perro", "test")]
    rows = [{"src": s, "tgt": t, "split": split} for s, t, split in pairs]
    out = tmp_path / "out"
    task = write_pairs(tmp_path / "p.jsonl", rows)
    manifest = prepare_translation(TaskOptions(task, str(out), separate_vocab=True))
    source = Tokenizer((out / "source_tokenizer.json").read_text())
    target = Tokenizer((out / "tokenizer.json").read_text())
    offset = manifest.target_offset
    assert offset == source.vocab_size and manifest.vocab_size == offset + target.vocab_size
    assert manifest.source_tokenizer is not None and manifest.eot_id == offset + target.eot_id
    val = load_translation(str(out)).splits["val"]
    assert source.decode(val.src[0]) == "the dog house"
    assert (val.tgt[0] >= offset).all()
    assert target.decode(val.tgt[0][:-1] - offset) == "la casa perro"


def test_separate_vocabularies_are_fitted_not_given(tmp_path):
    rows = [{"src": s, "tgt": t, "split": split} for s, t, split in PAIRS]
    first = tmp_path / "first"
    prepare_translation(TaskOptions(write_pairs(tmp_path / "p.jsonl", rows), str(first)))
    options = TaskOptions(
        f"translation-jsonl:{tmp_path / 'p.jsonl'}",
        str(tmp_path / "out"),
        tokenizer=str(first / "tokenizer.json"),
        separate_vocab=True,
    )
    with pytest.raises(UserError, match="--separate-vocab fits"):
        prepare_translation(options)
