"""Beam search for decoder-only generation reuses the encoder-decoder's (``beam_search``): a beam
of one is greedy sampling up to the end-of-text token, and a beam wide enough to keep every
hypothesis finds the best-scored continuation that trying them all finds."""

import itertools
from types import SimpleNamespace

import torch
from torch import nn

from clusterlm.models import ModelArgs, create_model
from clusterlm.train.generate import beam_generate, sample

EOT = 11


def test_a_beam_of_one_is_greedy_up_to_the_end_of_text():
    torch.manual_seed(0)
    args = ModelArgs(flavour="gpt2", vocab_size=12, block_size=8, n_layer=1, n_head=2,
                     n_kv_head=2, n_embd=16, ffn_hidden=32)  # fmt: skip
    model = create_model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    lengths = set()
    for prompt in ([1, 2], [3], [5, 7, 9]):
        greedy = sample(model, prompt, 12, temperature=0)  # past the block size: cropped
        ended = greedy[: greedy.index(EOT)] if EOT in greedy else greedy
        assert beam_generate(model, prompt, 12, beam=1, eot_id=EOT) == ended
        lengths.add(len(ended))
    assert max(lengths) > 1


class TableModel(nn.Module):
    """Next-token logits from a random table by (position, previous token): the search's inputs
    without a network."""

    def __init__(self, prompt_len: int, max_len: int, vocab: int):
        super().__init__()
        self.prompt_len = prompt_len
        self.args = SimpleNamespace(block_size=prompt_len + max_len)
        generator = torch.Generator().manual_seed(3)
        self.logits = 2 * torch.randn(max_len, vocab, vocab, generator=generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits[tokens.size(1) - self.prompt_len, tokens[:, -1]][:, None]

    def score(self, prompt: list[int], tokens: list[int], eot: int, penalty: float) -> float:
        steps = tokens + [eot] if len(tokens) < self.logits.size(0) else tokens
        previous, total = prompt[-1], 0.0
        for position, token in enumerate(steps):
            total += float(self.logits[position, previous].log_softmax(-1)[token])
            previous = token
        return total / len(steps) ** penalty


def test_a_beam_wider_than_every_hypothesis_finds_the_exhaustive_best():
    """3 words and the end-of-text token, at most 3 new tokens: 40 continuations, all kept by a
    beam of 64; the best by log-probability / length ** 0.7 among all of them."""
    eot, penalty, found = 3, 0.7, set()
    table = TableModel(prompt_len=2, max_len=3, vocab=4)
    every = [list(w) for n in range(4) for w in itertools.product(range(3), repeat=n)]
    for prompt in ([0, 1], [2, 0], [1, 2]):
        best = max(every, key=lambda tokens: table.score(prompt, tokens, eot, penalty))
        assert beam_generate(table, prompt, 3, 64, penalty, eot) == best
        found.add(tuple(best))
    assert len(found) > 1
