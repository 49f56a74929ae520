"""Load a trained model for evaluation or generation from a run directory or a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterlm import checkpoint
from clusterlm.config import Config, apply_overrides, config_from_dict
from clusterlm.distributed.runtime import Runtime
from clusterlm.errors import UserError
from clusterlm.hardware import resolve_device
from clusterlm.parallel import ParallelModel, parallelize
from clusterlm.parallel.precision import settle_precision
from clusterlm.train.session import build_model


@dataclass
class Loaded:
    cfg: Config
    model: ParallelModel  # the whole model in this process; ``model.parts[0]`` is the plain module
    runtime: Runtime
    path: Path
    state: dict[str, Any]  # the checkpoint's trainer state (step, loader, config, ...)

    @property
    def step(self) -> int:
        return self.state["step"]


def refuse_classifier(cfg: Config, path: Path) -> None:
    """Evaluation, generation and export read language models; a fine-tuned classifier is scored
    by `clusterlm finetune` itself."""
    if cfg.finetune.task:
        raise UserError(
            f"{path} is a classifier fine-tuned on {cfg.finetune.task}, not a language model; its "
            "validation and test metrics are in its run's metrics.jsonl"
        )


def load_for_inference(
    found: checkpoint.Verified,
    device: str = "auto",
    data_dir: str | None = None,
    precision: str | None = None,
) -> Loaded:
    """The whole model of a verified checkpoint in this process, in eval mode. ``data_dir`` and
    ``precision`` override the run's."""
    saved = config_from_dict(found.state["config"])
    refuse_classifier(saved, found.path)
    runtime = Runtime(device=resolve_device(device))
    cfg = apply_overrides(
        saved,
        {
            "data.dir": data_dir or saved.data.dir,
            "data.mix": "" if data_dir else saved.data.mix,  # a directory given replaces a mix
            "training.precision": settle_precision(
                precision or saved.training.precision, runtime.device
            ),
            "training.compile": False,  # a few forwards: not worth a compilation
            "training.activation_checkpointing": "none",  # nothing to recompute without a backward
        },
    )
    plain, source = build_model(cfg, cfg.model.vocab_size)
    model = parallelize(plain, cfg, None, runtime.device, source)
    model.load_state_dict(checkpoint.CheckpointReader(found.path))
    model.parts[0].eval()
    return Loaded(cfg, model, runtime, found.path, found.state)
