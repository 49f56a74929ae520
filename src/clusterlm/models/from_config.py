"""A model's arguments from a run's config: the model section, its 'derive it' zeros filled."""

from __future__ import annotations

import dataclasses

from clusterlm.config import Config, settle_model
from clusterlm.models.gpt import ModelArgs
from clusterlm.models.moe import MoeArgs


def resolve_model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    """The model's arguments, the config's 'derive it' zeros filled (``settle_model``)."""
    m = settle_model(cfg, vocab_size).model
    return ModelArgs(
        flavour=m.flavour,
        vocab_size=m.vocab_size,
        block_size=m.block_size,
        n_layer=m.n_layer,
        decoder_layers=m.decoder_layers,
        n_head=m.n_head,
        n_kv_head=m.n_kv_head,
        n_embd=m.n_embd,
        ffn_hidden=m.ffn_hidden,
        dropout=m.dropout,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        **{f.name: getattr(m, f.name) for f in dataclasses.fields(MoeArgs)},
    )
