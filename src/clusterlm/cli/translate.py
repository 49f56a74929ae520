"""`clusterlm translate`: translate lines of text with a trained encoder-decoder."""

from __future__ import annotations

import sys

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli.checkpoints import add_checkpoint_arguments
from clusterlm.cli.options import Parser
from clusterlm.errors import UserError
from clusterlm.train.decoding import Search
from clusterlm.train.inference import load_for_inference
from clusterlm.train.translate import check_translation_run, load_translator, translate_lines


def build_parser() -> Parser:
    parser = Parser(
        prog="clusterlm translate",
        description="Translate lines of text (one translation printed per line).",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--input", required=True, help="a text file, one sentence a line, or -")
    parser.add_argument("--beam", type=int, default=1, help="beams of the search (1 = greedy)")
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="a finished hypothesis scores log-probability / length ** this (default: 1.0)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=0,
        help="tokens of a translation at most (0 = the run's sequence length)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="lines translated together")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.beam < 1:
        raise UserError(f"--beam must be at least 1 (1 = greedy), got {args.beam}")
    if args.max_length < 0 or args.batch_size < 1:
        raise UserError("--max-length must be >= 0 and --batch-size >= 1")
    found = find_checkpoint(args.run, args.checkpoint)
    check_translation_run(found)
    lines = _read_lines(args.input)
    loaded = load_for_inference(found, args.device, args.data_dir, args.precision)
    seq_len = loaded.cfg.seq_len
    if args.max_length > seq_len:
        raise UserError(
            f"--max-length {args.max_length} exceeds the run's sequence length {seq_len}; "
            "give at most that"
        )
    out = translate_lines(
        loaded.model,
        load_translator(found),
        lines,
        Search(args.beam, args.length_penalty),
        seq_len,
        args.max_length or seq_len,
        args.batch_size,
    )
    for text in out.texts:
        print(text)
    if out.cut:
        print(f"note: {out.cut} lines were cut to {seq_len} tokens", file=sys.stderr)
    return 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"cannot read --input {path} ({err}); give a UTF-8 text file or -"
        ) from None
