"""Sample text from a checkpoint: `clusterlm generate`."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from clusterlm.errors import UserError


@torch.no_grad()
def sample(
    model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
    top_k: int = 0, seed: int = 0, device: torch.device | str = "cpu",
) -> list[int]:
    """Autoregressive sampling; the context is cropped to the model's block size."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    block = model.args.block_size
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
    return tokens[0, len(prompt):].tolist()


def main(argv: list[str]) -> int:
    from clusterlm.data.tokenizer import Tokenizer
    from clusterlm.train.loading import add_checkpoint_arguments, load_for_inference

    parser = argparse.ArgumentParser(prog="clusterlm generate", description="Sample text from a checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--max-new-tokens, --temperature and --top-k must be >= 0")
    loaded = load_for_inference(args)
    tokenizer = Tokenizer.load(loaded.path / "tokenizer.json")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no tokens; give some text")
    with loaded.precision.autocast():
        out = sample(loaded.model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                     args.seed, loaded.runtime.device)
    print(args.prompt + tokenizer.decode(out))
    return 0
