"""Greedy decoding of the encoder–decoder, batched: the encoder runs once per batch and the
decoder feeds one new token per step, reusing its cached keys and values
(``clusterlm.models.seq2seq.DecodingCache``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clusterlm.data.special_tokens import PAD
from clusterlm.models.seq2seq import DecodingCache


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    source: torch.Tensor,
    eot_id: int,
    max_len: int,
    all_done: Callable[[bool], bool] = lambda done: done,
) -> torch.Tensor:
    """The most likely next token, step by step, for each source row [B, S] (PAD-padded): the
    tokens [B, max_len] up to and without the end-of-text token, PAD after it. ``model`` is the
    encoder–decoder, or a data-parallel wrapper of it (its forward takes the cache). Decoding
    stops when ``all_done(every row of this batch ended)`` says so: under sharded data parallelism
    every rank must run the same number of forward passes, so it asks the other ranks."""
    batch = source.size(0)
    cache = DecodingCache(source)
    tokens = torch.full((batch, 1), eot_id, dtype=torch.long, device=source.device)
    out = torch.full((batch, max_len), PAD, dtype=torch.long, device=source.device)
    done = torch.zeros(batch, dtype=torch.bool, device=source.device)
    for step in range(max_len):
        tokens = model(tokens, cache=cache)[:, -1].argmax(-1, keepdim=True)
        done |= tokens[:, 0] == eot_id
        out[:, step] = tokens[:, 0].masked_fill(done, PAD)
        if all_done(bool(done.all())):
            break
    return out
