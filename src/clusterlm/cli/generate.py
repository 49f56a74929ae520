"""`clusterlm generate`: sample text from a checkpoint."""

from __future__ import annotations

from clusterlm.cli.checkpoints import add_checkpoint_arguments, load
from clusterlm.cli.options import Parser
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError
from clusterlm.train.generate import beam_generate, sample


def build_parser() -> Parser:
    parser = Parser(prog="clusterlm generate", description="Sample text from a checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)"
    )
    parser.add_argument(
        "--top-k", type=int, default=200, help="sample among the k likeliest tokens (0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--beam",
        type=int,
        help="beam search with this many beams instead of sampling; it ends at the end-of-text "
        "token (--temperature, --top-k and --seed do not apply)",
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="with --beam: a finished hypothesis scores log-probability / length ** this",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--max-new-tokens, --temperature and --top-k must be >= 0")
    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam must be at least 1 (1 = greedy), got {args.beam}")
    loaded = load(args)
    if loaded.cfg.model.flavour == "bert":
        raise UserError(
            f"{loaded.path} is a bert encoder, which predicts masked tokens and does not generate "
            "text; generate from a gpt2 or llama run"
        )
    if loaded.cfg.model.flavour == "mbart":
        raise UserError(
            f"{loaded.path} is an encoder-decoder trained to translate; score its translations "
            "with `clusterlm eval`, translate with `clusterlm translate`, or generate from a gpt2 "
            "or llama run"
        )
    tokenizer = Tokenizer.load(loaded.path / "tokenizer.json")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no tokens; give some text")
    model, device = loaded.model.parts[0], loaded.runtime.device
    with loaded.model.precision.autocast():
        if args.beam is not None:
            out = beam_generate(
                model,
                prompt,
                args.max_new_tokens,
                args.beam,
                args.length_penalty,
                tokenizer.eot_id,
                device,
            )
        else:
            out = sample(
                model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, device
            )
    print(args.prompt + tokenizer.decode(out))
    return 0
