"""The bad-input corpus of long context: context parallelism's layouts and document masking
(``bad_inputs_table.py`` says how an entry reads)."""

from __future__ import annotations

from bad_inputs_harness import TINY, case, copy_of, edit_json

TRAIN = ("train", "--data.dir", "{data}", "--training.out_dir", "{tmp}/out", *TINY)
CP2 = ("--nproc", "2", "--parallel.cp", "2")


def _no_separator(manifest: dict) -> None:
    manifest["eot_id"] = None  # as data prepared with a tokenizer that has no end-of-text token


LONG_CONTEXT = [
    case(
        "cp-seq-len-not-divisible",
        *TRAIN,
        *CP2,
        "--training.seq_len",
        "14",
        expect="divisible by 2 x parallel.cp",
    ),
    case(
        "cp-all-to-all-heads-not-divisible",
        *TRAIN,
        "--nproc",
        "4",
        "--parallel.cp",
        "4",
        "--parallel.cp_attention",
        "all_to_all",
        expect="make model.n_head / parallel.tp divisible by parallel.cp",
    ),
    case(
        "cp-tensor-parallel-with-ddp",
        *TRAIN,
        "--nproc",
        "4",
        "--parallel.cp",
        "2",
        "--parallel.tp",
        "2",
        expect="composes with zero2, zero3 or hsdp",
        subprocess=True,
    ),
    case(
        "cp-learned-positions-shorter-than-sequence",
        *TRAIN,
        *CP2,
        "--training.seq_len",
        "32",
        expect="gpt2's learned table",
    ),
    *[
        case(
            f"{name}-without-separator",
            *TRAIN[:2],
            "{tmp}/data",
            *TRAIN[3:],
            *extra,
            f"--{key}",
            "true",
            setup=copy_of("data", "data", edit_json("manifest.json", _no_separator)),
            expect=f"{key} finds document boundaries",
            subprocess=bool(extra),
        )
        for name, key, extra in [
            ("document-masking", "data.document_masking", ()),
            ("document-masking-nproc", "data.document_masking", ("--nproc", "2")),
            ("position-reset", "model.position_reset", ()),
        ]
    ],
]
