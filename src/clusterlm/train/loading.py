"""Load a trained model for evaluation or generation from a run directory or a checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from clusterlm.config import Config, config_from_dict
from clusterlm.errors import UserError
from clusterlm.train import checkpoint
from clusterlm.train.hardware import resolve_device
from clusterlm.train.precision import Precision
from clusterlm.train.runtime import Runtime


@dataclass
class Loaded:
    cfg: Config
    model: nn.Module
    runtime: Runtime
    precision: Precision
    path: Path
    state: dict[str, Any]  # the checkpoint's trainer state (step, loader, config, ...)

    @property
    def step(self) -> int:
        return self.state["step"]


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/default", help="training.out_dir of the run (its newest checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (overrides --run)")
    parser.add_argument("--data-dir", help="prepared data directory (default: the one the run trained on)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="compute precision (default: the run's)")


def load_for_inference(args: argparse.Namespace) -> Loaded:
    from clusterlm.train.trainer import build_model  # the trainer builds models the one way

    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        path = checkpoint.resolve_resume("auto", Path(args.run) / "checkpoints")
        if path is None:
            raise UserError(f"no complete checkpoint in {args.run}/checkpoints; train first or pass --checkpoint")
    state = checkpoint.verify(path)
    cfg = config_from_dict(state["config"])
    if args.data_dir:
        cfg.data.dir = args.data_dir
    if args.precision:
        cfg.training.precision = args.precision
    runtime = Runtime(device=resolve_device(args.device))
    model = build_model(cfg, cfg.model.vocab_size, runtime.device)
    checkpoint.load_checkpoint(path, [model])
    model.eval()
    return Loaded(cfg, model, runtime, Precision(cfg.training.precision, runtime.device), path, state)
