"""A trained checkpoint as a Hugging Face directory (``clusterlm export hf``)."""

from __future__ import annotations

import os

import torch

from clusterlm.checkpoint.dcp_io import CheckpointReader
from clusterlm.checkpoint.resume import Verified
from clusterlm.config import config_from_dict
from clusterlm.errors import UserError
from clusterlm.interop import export_hf
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.seq2seq import SEQ2SEQ_FLAVOUR
from clusterlm.train.inference import refuse_classifier
from clusterlm.train.translate import TRANSLATION_STATE


def export_checkpoint_hf(
    found: Verified, out: str | os.PathLike[str], max_shard_bytes: int, dtype: str = "fp32"
) -> list[str]:
    """Write ``found``'s model to ``out`` reading one tensor at a time from its (possibly sharded,
    any layout) files; returns the file names written."""
    cfg = config_from_dict(found.state["config"])
    refuse_classifier(cfg, found.path)
    translation = found.state.get(TRANSLATION_STATE)
    if cfg.model.flavour == SEQ2SEQ_FLAVOUR and (
        translation is None or translation["source_tokenizer_sha256"] is not None
    ):
        raise UserError(
            f"{found.path} is an encoder-decoder trained with a vocabulary per side (or saved "
            "before checkpoints recorded it); a Hugging Face directory holds one tokenizer: "
            "export a run prepared without --separate-vocab, or translate with "
            "`clusterlm translate`"
        )
    args = resolve_model_args(cfg, cfg.model.vocab_size)
    reader = CheckpointReader(found.path)
    saved = reader.model_shapes()

    def read(name: str) -> torch.Tensor:
        if name not in saved:
            raise UserError(
                f"checkpoint {found.path} has no tensor {name}; it is not a complete model"
            )
        return reader.model_tensor(name)

    tokenizer = (found.path / "tokenizer.json").read_text(encoding="utf-8")
    return export_hf(out, args, read, tokenizer, max_shard_bytes, dtype)
