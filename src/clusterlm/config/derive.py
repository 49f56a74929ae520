"""Values derived from the config and the data: the model's sizes and gradient accumulation."""

from __future__ import annotations

import dataclasses
import math

from clusterlm.config.sections import Config
from clusterlm.errors import UserError


def settle_model(cfg: Config, vocab_size: int) -> Config:
    """``cfg`` with the model's 'derive it' zeros filled: vocabulary, KV heads, MLP width."""
    m = cfg.model
    if m.vocab_size and m.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's {vocab_size}; "
            "set it to 0 to take the tokenizer's"
        )
    if m.ffn_hidden:
        ffn_hidden = m.ffn_hidden
    elif m.flavour == "llama":
        ffn_hidden = m.ffn_multiple_of * math.ceil(8 * m.n_embd / 3 / m.ffn_multiple_of)
    else:
        ffn_hidden = 4 * m.n_embd
    settled = dataclasses.replace(
        m,
        vocab_size=m.vocab_size or vocab_size,
        n_kv_head=m.n_kv_head or m.n_head,
        ffn_hidden=ffn_hidden,
    )
    return dataclasses.replace(cfg, model=settled)


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    per_micro_step = cfg.training.micro_batch_size * cfg.seq_len * dp_size
    target = cfg.training.tokens_per_step or per_micro_step
    if target % per_micro_step:
        raise UserError(
            f"training.tokens_per_step ({target}) must be a multiple of "
            f"micro_batch_size x seq_len x data-parallel ranks = {per_micro_step}"
        )
    return target // per_micro_step
