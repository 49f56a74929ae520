"""`clusterlm export hf`: a checkpoint as a Hugging Face model directory."""

from __future__ import annotations

import argparse
import time

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli.parser import Parser
from clusterlm.interop.to_hf import DTYPES
from clusterlm.interop.writer import parse_size
from clusterlm.train.export_checkpoint import export_checkpoint_hf


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="clusterlm export", description="Export a trained model to another format.")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf",
        help="a Hugging Face directory (config.json, safetensors, tokenizer) for transformers",
        description="Write config.json, model.safetensors (sharded with an index past "
        "--max-shard-size) and the tokenizer files, loadable with AutoModelForCausalLM "
        "(bert: AutoModelForMaskedLM, mbart: AutoModelForSeq2SeqLM) and AutoTokenizer.",
    )
    hf.add_argument(
        "--run", default="runs/default", help="training.out_dir of the run (its newest checkpoint)"
    )
    hf.add_argument("--checkpoint", help="a checkpoint directory (overrides --run)")
    hf.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    hf.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file before the weights are split, e.g. 5GB, 500MB "
        "(default: 5GB)",
    )
    hf.add_argument(
        "--dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="precision of the saved weights (default: fp32, the trained master weights)",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    max_shard = parse_size(args.max_shard_size)
    found = find_checkpoint(args.run, args.checkpoint)
    started = time.perf_counter()
    written = export_checkpoint_hf(found, args.out, max_shard, args.dtype)
    elapsed = time.perf_counter() - started
    print(f"exported {found.path} to {args.out} in {elapsed:.1f}s: {', '.join(written)}")
    return 0
