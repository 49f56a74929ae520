"""Autoregressive sampling and beam search from a trained model (`clusterlm generate`)."""

from __future__ import annotations

import torch
from torch import nn

from clusterlm.models import model_args
from clusterlm.train.decoding import beam_search


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Autoregressive sampling; the context is cropped to the model's block size."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    block = model_args(model).block_size
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -block:])[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt) :].tolist()


class _Hypotheses:
    """Each beam's whole sequence, for a model without a KV cache: every step reruns the context,
    cropped to the block size, like ``sample``."""

    def __init__(self, model: nn.Module, block: int):
        self.model, self.block = model, block
        self.sequences: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        seqs = tokens if self.sequences is None else torch.cat([self.sequences, tokens], 1)
        self.sequences = seqs
        return self.model(seqs[:, -self.block :])[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        assert self.sequences is not None
        self.sequences = self.sequences[rows]


def beam_generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    beam: int,
    length_penalty: float = 1.0,
    eot_id: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """The continuation of ``prompt`` by beam search (``clusterlm.train.decoding.beam_search``,
    Hugging Face's ``generate(num_beams=beam, early_stopping=True)``): it ends at the end-of-text
    token, without it, or after ``max_new_tokens``. Without an ``eot_id`` nothing ends early."""
    if max_new_tokens == 0:
        return []
    first = torch.tensor([prompt] * beam, dtype=torch.long, device=device)
    hypotheses = _Hypotheses(model, model_args(model).block_size)
    never = -2  # no token id: hypotheses end only at the length limit
    found = beam_search(
        hypotheses.step,
        hypotheses.reorder,
        first,
        never if eot_id is None else eot_id,
        max_new_tokens,
        beam,
        length_penalty,
    )[0]
    return found[found >= 0].tolist()
