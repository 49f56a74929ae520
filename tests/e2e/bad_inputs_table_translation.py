"""The bad-input corpus, translation tasks: pairs without a side, sides of different lengths,
empty splits, bad split names, beams of 0.
``CASES`` in ``bad_inputs_table.py`` includes these. (Missing SWORD modules cannot be staged here
without uninstalling them: tests/unit/data/test_bible.py checks the line names the package.)"""

from __future__ import annotations

import json
from pathlib import Path

from bad_inputs_harness import TINY, both, case, copy_of, jsonl, write
from bad_inputs_table_hardening import resealed


def pairs(id: str, content: bytes | str, expect: str) -> object:
    return case(
        id,
        "prepare",
        "--task",
        "translation-jsonl:{tmp}/pairs.jsonl",
        "--out",
        "{tmp}/out",
        setup=write("pairs.jsonl", content),
        expect=expect,
    )


def _as_classifier(root: Path) -> None:  # a run fine-tuned on a task, as its trainer.json says
    state = json.loads((root / "trainer.json").read_text())
    state["config"]["finetune"]["task"] = "/data/labels"
    (root / "trainer.json").write_text(json.dumps(state))


TRANSLATE = ("translate", "--input", "-")
TRAIN_PAIRS = [{"src": "the house", "tgt": "la casa", "split": "train"}] * 3
TRANSLATION = [
    pairs("translation-missing-src", jsonl({"tgt": "la casa"}), 'no "src"'),
    pairs("translation-missing-tgt", jsonl({"src": "the house"}), 'no "tgt"'),
    pairs("translation-empty-split", jsonl(*TRAIN_PAIRS), "the val split"),
    pairs(
        "translation-bad-split",
        jsonl({"src": "a", "tgt": "b", "split": "dev"}),
        '"split" of train, val, test',
    ),
    pairs("translation-no-pairs", "\n\n", "holds no pairs"),
    case(
        "translation-line-counts-differ",
        "prepare",
        "--task",
        "translation-text:{tmp}/en.txt,{tmp}/es.txt",
        "--out",
        "{tmp}/out",
        setup=both(write("en.txt", "a\nb\nc\n"), write("es.txt", "a\nb\n")),
        expect="has 3 lines but",
    ),
    case(
        "separate-vocab-on-a-classification-task",
        "prepare",
        "--task",
        "play-classification",
        "--separate-vocab",
        "--out",
        "{tmp}/out",
        expect="--separate-vocab",
    ),
    case(
        "mbart-on-a-corpus",
        "train",
        "--data.dir",
        "{data}",
        "--training.out_dir",
        "{tmp}/out",
        "--model.flavour",
        "mbart",
        *TINY,
        expect="translation task",
    ),
    case("translation-beam-zero", "eval", "--run", "{run}", "--beam", "0", expect="--beam"),
    case("translate-a-decoder", *TRANSLATE, "--run", "{run}", expect="not an encoder-decoder"),
    case(
        "translate-a-classifier",
        *TRANSLATE,
        "--checkpoint",
        "{tmp}/ckpt",
        setup=copy_of("ckpt", "ckpt", resealed(_as_classifier)),
        expect="is a classifier",
    ),
    case("translate-beam-zero", *TRANSLATE, "--run", "{run}", "--beam", "0", expect="--beam"),
    case("generate-beam-zero", "generate", "--run", "{run}", "--beam", "0", expect="--beam"),
    case("beam-on-a-language-model", "eval", "--run", "{run}", "--beam", "2", expect="--beam"),
    case(
        "translations-of-a-language-model",
        "eval",
        "--run",
        "{run}",
        "--translations",
        "{tmp}/out.txt",
        expect="--translations",
    ),
]
