"""Options shared by the commands that read a trained model: `eval` and `generate`."""

from __future__ import annotations

import argparse

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.train.inference import Loaded, load_for_inference


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", default="runs/default", help="training.out_dir of the run (its newest checkpoint)"
    )
    parser.add_argument("--checkpoint", help="a checkpoint directory (overrides --run)")
    parser.add_argument(
        "--data-dir", help="prepared data directory (default: the one the run trained on)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--precision",
        default=None,
        choices=("fp32", "bf16", "fp16"),
        help="compute precision (default: the run's)",
    )


def load(args: argparse.Namespace) -> Loaded:
    found = find_checkpoint(args.run, args.checkpoint)
    return load_for_inference(found, args.device, args.data_dir, args.precision)
