"""`clusterlm eval`: validation loss, perplexity and token accuracy of a checkpoint (the masked
tokens' for a masked LM)."""

from __future__ import annotations

import math

from clusterlm.cli.checkpoints import add_checkpoint_arguments, load
from clusterlm.cli.options import Parser
from clusterlm.config import apply_overrides
from clusterlm.errors import UserError
from clusterlm.train.evaluate import eval_windows, evaluate


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="clusterlm eval", description="Validation loss and perplexity of a checkpoint."
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--split", default="val", choices=("train", "val"), help="which split to score"
    )
    parser.add_argument(
        "--batches", type=int, default=0, help="batches to score (0 = training.eval_batches)"
    )
    args = parser.parse_args(argv)
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
    loss, accuracy = evaluate(loaded.model, cfg, loaded.runtime, windows, args.split)
    print(
        f"{args.split} loss {loss:.4f} perplexity {math.exp(loss):.2f} accuracy {accuracy:.4f} "
        f"({windows} windows of {cfg.seq_len} tokens, checkpoint step {loaded.step})"
    )
    return 0
