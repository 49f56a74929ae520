"""``model.init_from = "hf:DIR"``: the model's shape comes from that directory's config.json.

Keys the user set (in the TOML file or on the command line) must agree with it; the others take
its values, so every later check (layout, pipeline, memory plan) sees the real model. One key may
differ: a ``model.block_size`` below the model's trains on a shorter context."""

from __future__ import annotations

from clusterlm.config.sections import Config
from clusterlm.errors import UserError
from clusterlm.interop import hf_model_config

HF_PREFIX = "hf:"


def pretrained_dir(cfg: Config) -> str | None:
    """The Hugging Face directory the model starts from, if any."""
    source = cfg.model.init_from
    return source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) and len(source) > len(HF_PREFIX) else None


def adopt_pretrained_shape(cfg: Config, explicit: set[str]) -> None:
    """Fill ``cfg.model`` from the pretrained directory's config.json; ``explicit`` are the dotted
    keys the user set."""
    directory = pretrained_dir(cfg)
    if directory is None:
        return
    for key, value in hf_model_config(directory).items():
        current = getattr(cfg.model, key)
        if f"model.{key}" in explicit and current not in (0, value):
            if key == "block_size" and current < value:
                continue
            raise UserError(f"model.{key} = {current!r} contradicts {directory}/config.json, which gives {value!r}; "
                            f"drop model.{key} to take the pretrained model's")
        setattr(cfg.model, key, value)
