"""`clusterlm prepare`: the command line of ``clusterlm.data.prepare.prepare``."""

from __future__ import annotations

import argparse
import os

from clusterlm.cli.options import Parser
from clusterlm.data.lines import DEFAULT_MAX_LINE_BYTES
from clusterlm.data.prepare import DEFAULT_BPE_VOCAB, DEFAULT_SHARD_TOKENS, PrepareOptions, prepare
from clusterlm.data.task_prepare import (
    BIBLE_TASK,
    JSONL_PREFIX,
    PLAY_TASK,
    TRANSLATION_JSONL_PREFIX,
    TRANSLATION_TEXT_PREFIX,
    TaskOptions,
    prepare_task,
)
from clusterlm.data.translation_prepare import is_translation_task, prepare_translation
from clusterlm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="clusterlm prepare",
        description="Tokenize text into checksummed token shards.",
        epilog="Inputs are read as UTF-8; \\r\\n becomes \\n and Project Gutenberg headers, "
        "footers and licence notices are removed. Validation data is a seeded span of "
        "--val-fraction of every document's tokens.",
    )
    _add_io_arguments(p)
    _add_corpus_arguments(p)
    _add_task_arguments(p)
    return p


def _add_io_arguments(p: argparse.ArgumentParser) -> None:
    """Where the text comes from and where the dataset goes."""
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, directories (recursive), globs or fsspec URLs; "
        "none: the embedded Shakespeare corpus",
    )
    p.add_argument(
        "--input",
        dest="more_inputs",
        action="append",
        default=[],
        metavar="INPUT",
        help="one more input, like a positional INPUT (repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory: local path or fsspec URL")


def _add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    """How the text is read, tokenized, split into train and validation, and sharded."""
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char, bpe, the path of an existing tokenizer.json, or hf:DIR for the tokenizer "
        "of a Hugging Face model directory (default: char)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"vocabulary size of a bpe tokenizer (default: {DEFAULT_BPE_VOCAB})",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of every document's tokens held out for validation; with --task, of every "
        "label's scenes (or lines) (default: 0.1)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"most tokens per shard file (default: {DEFAULT_SHARD_TOKENS})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="tokenizer processes (default: min(4, CPU count)); output does not depend on it",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument(
        "--force", action="store_true", help="replace a different dataset already in --out"
    )
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        help="refuse an input line (of a text file, or of --task jsonl:PATH) longer than this many "
        f"bytes; inputs are read a line at a time (default: {DEFAULT_MAX_LINE_BYTES}, 1 MiB)",
    )


def _add_task_arguments(p: argparse.ArgumentParser) -> None:
    """A labelled classification task written instead of a corpus."""
    task = p.add_argument_group("labelled and translation tasks")
    task.add_argument(
        "--task",
        default=None,
        help=f"write a classification task instead of a corpus: {PLAY_TASK} (passages of the "
        f"embedded plays, labelled with their play, split by scene) or {JSONL_PREFIX}PATH "
        '(JSONL lines {"text", "label"[, "split"]}); or a translation task: '
        f"{BIBLE_TASK} (the English-Spanish Bible from Debian's SWORD modules, split by book) "
        f'or {TRANSLATION_JSONL_PREFIX}PATH (JSONL lines {{"src", "tgt"[, "split"]}}) or '
        f"{TRANSLATION_TEXT_PREFIX}SRC,TGT (two text files, line i of each a pair); "
        "takes no INPUT",
    )
    task.add_argument(
        "--passage-tokens",
        type=int,
        default=64,
        help=f"{PLAY_TASK}: most tokens per passage of whole lines (default: 64)",
    )
    task.add_argument(
        "--separate-vocab",
        action="store_true",
        help="translation tasks: fit a tokenizer to each side instead of one to both",
    )
    task.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of every label's scenes (or lines) held out for test (default: 0.1)",
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.task is not None:
        if args.inputs or args.more_inputs or args.vocab_size is not None:
            raise UserError(
                "--task takes no INPUT and no --vocab-size; drop them (the task names its own text)"
            )
        options = TaskOptions(
            task=args.task,
            out=args.out,
            tokenizer=args.tokenizer,
            seed=args.seed,
            passage_tokens=args.passage_tokens,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            force=args.force,
            max_line_bytes=args.max_line_bytes,
            separate_vocab=args.separate_vocab,
        )
        if args.separate_vocab and not is_translation_task(args.task):
            raise UserError("--separate-vocab applies to translation tasks; drop it")
        if is_translation_task(args.task):
            prepare_translation(options)
        else:
            prepare_task(options)
        return 0
    prepare(
        PrepareOptions(
            inputs=tuple(args.inputs + args.more_inputs),
            out=args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            seed=args.seed,
            force=args.force,
            max_line_bytes=args.max_line_bytes,
        )
    )
    return 0
