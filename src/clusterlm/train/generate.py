"""Autoregressive sampling from a trained model (`clusterlm generate`)."""

from __future__ import annotations

import torch
from torch import nn

from clusterlm.models import model_args


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
