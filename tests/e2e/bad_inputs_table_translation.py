"""The bad-input corpus, translation tasks: pairs without a side, sides of different lengths,
empty splits, bad split names, beams of 0, the encoder-decoder under sequence or pipeline
parallelism, an mBART import with an output bias, the export of a run with a vocabulary per side.
``CASES`` in ``bad_inputs_table.py`` includes these. (Missing SWORD modules cannot be staged here
without uninstalling them: tests/unit/data/test_bible.py checks the line names the package.)"""

from __future__ import annotations

import json
from pathlib import Path

from bad_inputs_harness import TINY, Shared, both, case, copy_of, jsonl, write
from bad_inputs_table_hardening import resealed
from translation_pairs import prepare_pairs


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


def _mbart_with_logits_bias(tmp: Path, _shared: Shared) -> None:
    """A translation task, and an mBART directory whose final_logits_bias is not zero."""
    import transformers

    prepare_pairs(tmp, count=40)
    config = transformers.MBartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=16, activation_function="gelu_pytorch_tanh", scale_embedding=False,
    )  # fmt: skip
    model = transformers.MBartForConditionalGeneration(config)
    model.final_logits_bias.fill_(0.5)
    model.save_pretrained(tmp / "hf", safe_serialization=True)


def _separate_vocab_run(tmp: Path, _shared: Shared) -> None:
    """A translation run of 2 steps on a task prepared with a tokenizer per side."""
    from clusterlm.cli import main as cli

    prepare_pairs(tmp, count=40, separate_vocab=True)
    argv = ["train", "--data.dir", str(tmp / "task"), "--training.out_dir", str(tmp / "run")]
    assert cli([*argv, "--model.flavour", "mbart", *TINY]) == 0


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
    *[
        case(
            f"mbart-{id}",
            "train",
            "--data.dir",
            "{data}",
            "--training.out_dir",
            "{tmp}/out",
            "--model.flavour",
            "mbart",
            *argv,
            *TINY,
            expect="no pipeline or sequence-parallel plan",
        )
        for id, argv in [
            ("sequence-parallel", ["--parallel.tp=2", "--parallel.sequence_parallel=true"]),
            ("pipeline", ["--parallel.pp=2"]),
        ]
    ],
    case(
        "mbart-import-logits-bias",
        "train",
        "--data.dir",
        "{tmp}/task",
        "--training.out_dir",
        "{tmp}/out",
        "--model.flavour",
        "mbart",
        "--model.init_from",
        "hf:{tmp}/hf",
        *TINY,
        setup=_mbart_with_logits_bias,
        expect="final_logits_bias is non-zero",
    ),
    case(
        "mbart-export-separate-vocab",
        "export",
        "hf",
        "--run",
        "{tmp}/run",
        "--out",
        "{tmp}/hf",
        setup=_separate_vocab_run,
        expect="--separate-vocab",
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
