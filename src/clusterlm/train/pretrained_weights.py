"""Training from a Hugging Face model (``model.init_from = "hf:DIR"``): its tokenizer must be the
one the data was prepared with, and its weights are the source the model is materialized from."""

from __future__ import annotations

from pathlib import Path

from clusterlm.config import Config
from clusterlm.config.pretrained import pretrained_dir
from clusterlm.data.manifest import Manifest
from clusterlm.data.translation import TranslationManifest
from clusterlm.errors import UserError
from clusterlm.files import sha256_file
from clusterlm.interop import hf_source
from clusterlm.models.init import ParamSource


def check_pretrained_tokenizer(cfg: Config, manifest: Manifest | TranslationManifest) -> None:
    """The data's token ids must mean what the pretrained weights learned them as."""
    directory, data_dir, vocab_size = pretrained_dir(cfg), cfg.data.dir, cfg.model.vocab_size
    if directory is None:
        return
    fix = f"prepare the data with `clusterlm prepare --tokenizer hf:{directory}`"
    shipped = Path(directory) / "tokenizer.json"
    if shipped.is_file() and sha256_file(shipped) != manifest.tokenizer.sha256:
        raise UserError(
            f"{data_dir} was tokenized with a different tokenizer than {shipped}; {fix}"
        )
    if manifest.vocab_size > vocab_size:
        raise UserError(
            f"{data_dir}'s tokenizer has {manifest.vocab_size} tokens "
            f"but the weights in {directory} know {vocab_size}; {fix}"
        )


def pretrained_source(cfg: Config) -> ParamSource | None:
    """Where the initial weights come from when the config names a pretrained model: each rank
    reads only the slices of its own shards."""
    directory = pretrained_dir(cfg)
    return None if directory is None else hf_source(directory)
