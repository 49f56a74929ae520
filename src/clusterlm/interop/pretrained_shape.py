"""A pretrained model's shape, adopted into a config: ``model.init_from = "hf:DIR"`` takes it from
that directory's config.json, ``finetune.init_from`` (a run or checkpoint directory) from the
config saved with the checkpoint; ``load_config`` builds a run's config with it.

Keys the user set (in the TOML file or on the command line) must agree with it; the others take
its values, so every later check (layout, pipeline, memory plan) sees the real model. Two keys may
differ: a ``model.block_size`` below the model's trains on a shorter context, and
``model.dropout`` is a training choice."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from clusterlm.checkpoint.directory import TRAINER_STATE, checkpoint_of
from clusterlm.config import Config, build_config
from clusterlm.config.pretrained import pretrained_dir
from clusterlm.errors import UserError
from clusterlm.interop.source import hf_model_config


def load_config(config_path: str | None, overrides: dict[str, Any]) -> Config:
    """A run's config: the TOML file and the dotted overrides, the pretrained model's shape
    adopted, then checked (``clusterlm.config.build_config``)."""
    return build_config(config_path, overrides, resolve=adopt_pretrained_shape)


def adopt_pretrained_shape(cfg: Config, explicit: set[str]) -> Config:
    """``cfg`` with ``model`` filled from the pretrained model's saved shape; ``explicit`` are the
    dotted keys the user set."""
    directory = pretrained_dir(cfg)
    if directory is not None:
        return _adopt(cfg, explicit, hf_model_config(directory), f"{directory}/config.json")
    if cfg.finetune.init_from:
        path, model = pretrained_checkpoint_model(cfg.finetune.init_from)
        return _adopt(cfg, explicit, model, str(path))
    return cfg


def pretrained_checkpoint_model(source: str) -> tuple[Any, dict[str, Any]]:
    """(checkpoint directory, its run's ``model`` settings) of a run or checkpoint directory."""
    path = checkpoint_of(source)
    if path is None:
        raise UserError(
            f"finetune.init_from {source!r} is neither a complete checkpoint nor a run directory "
            "with one; point it at a training run's out_dir or one of its checkpoints/step_* "
            "directories"
        )
    try:
        model = dict(json.loads((path / TRAINER_STATE).read_text())["config"]["model"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise UserError(
            f"checkpoint {path} has no readable {TRAINER_STATE}; it is damaged, pick another"
        ) from None
    model.pop("init_from", None)  # where the pretrained run began is not this run's concern
    return path, model


def _adopt(cfg: Config, explicit: set[str], values: dict[str, Any], where: str) -> Config:
    adopted = {}
    for key, value in values.items():
        if not hasattr(cfg.model, key):
            raise UserError(
                f"{where} sets model.{key}, which this version does not know; "
                "it comes from another version of clusterlm"
            )
        current = getattr(cfg.model, key)
        if f"model.{key}" in explicit and current not in (0, value):
            if (key == "block_size" and current < value) or key == "dropout":
                continue
            raise UserError(
                f"model.{key} = {current!r} contradicts {where}, which gives {value!r}; "
                f"drop model.{key} to take the pretrained model's"
            )
        adopted[key] = value
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **adopted))
