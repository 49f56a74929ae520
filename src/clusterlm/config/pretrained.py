"""Where a pretrained model comes from: ``model.init_from = "hf:DIR"`` names a Hugging Face
directory (its shape is adopted by ``clusterlm.interop.pretrained_shape``)."""

from __future__ import annotations

from clusterlm.config.sections import Config

HF_PREFIX = "hf:"


def pretrained_dir(cfg: Config) -> str | None:
    """The Hugging Face directory the model starts from, if any."""
    source = cfg.model.init_from
    return (
        source[len(HF_PREFIX) :]
        if source.startswith(HF_PREFIX) and len(source) > len(HF_PREFIX)
        else None
    )
