"""`clusterlm eval`: validation loss, perplexity and token accuracy of a checkpoint (the masked
tokens' for a masked LM); for a translation run, loss, accuracy, BLEU and chrF of a split."""

from __future__ import annotations

import math

from clusterlm.cli.checkpoints import add_checkpoint_arguments, load
from clusterlm.cli.options import Parser
from clusterlm.config import apply_overrides
from clusterlm.data.translation import is_translation_dir
from clusterlm.errors import UserError
from clusterlm.files import atomic_write
from clusterlm.train.decoding import Search
from clusterlm.train.evaluate import eval_windows, evaluate
from clusterlm.train.translation_task import evaluate_translation


def build_parser() -> Parser:
    parser = Parser(
        prog="clusterlm eval", description="Validation loss and perplexity of a checkpoint."
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--split",
        default="val",
        choices=("train", "val", "test"),
        help="which split to score (test: translation tasks)",
    )
    parser.add_argument(
        "--batches", type=int, default=0, help="batches to score (0 = training.eval_batches)"
    )
    parser.add_argument(
        "--beam",
        type=int,
        default=1,
        help="translation runs: beams of the search (default: 1, greedy)",
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="translation runs: a hypothesis scores log-probability / length ** this "
        "(default: 1.0)",
    )
    parser.add_argument(
        "--translations",
        default="",
        help="translation runs: also write each scored pair's translation to this file, one a "
        "line in the split's order",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.beam < 1:
        raise UserError(f"--beam must be at least 1 (1 = greedy), got {args.beam}")
    if args.batches < 0:
        raise UserError(
            f"--batches must be >= 0 (0 = the run's training.eval_batches), got {args.batches}"
        )
    loaded = load(args)
    cfg = (
        apply_overrides(loaded.cfg, {"training.eval_batches": args.batches})
        if args.batches
        else loaded.cfg
    )
    windows = eval_windows(cfg, loaded.state.get("dp_size", 1))
    if is_translation_dir(cfg.data.dir):
        limit = windows if args.batches else None  # every pair unless --batches says otherwise
        search = Search(args.beam, args.length_penalty)
        scores, texts = evaluate_translation(
            loaded.model, cfg, loaded.runtime, args.split, limit, search
        )
        if args.translations:
            lines = "".join(f"{text}\n" for text in texts)
            atomic_write(args.translations, lines, "--translations")
        how = "greedy" if args.beam == 1 else f"beam {args.beam}"
        print(
            f"{args.split} loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f} "
            f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} "
            f"({how}, checkpoint step {loaded.step})"
        )
        return 0
    if args.split == "test":
        raise UserError(f"{cfg.data.dir} is a corpus with train and val splits; use --split val")
    if args.beam != 1 or args.length_penalty != 1.0 or args.translations:
        raise UserError(
            "--beam, --length-penalty and --translations apply to runs trained on a translation "
            "task; drop them"
        )
    loss, accuracy = evaluate(loaded.model, cfg, loaded.runtime, windows, args.split)
    print(
        f"{args.split} loss {loss:.4f} perplexity {math.exp(loss):.2f} accuracy {accuracy:.4f} "
        f"({windows} windows of {cfg.seq_len} tokens, checkpoint step {loaded.step})"
    )
    return 0
