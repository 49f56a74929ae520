"""Greedy and beam decoding: a beam of one is greedy, batched equals one row at a time (the
encoder-decoder's cache reordered with its beams), and a beam wide enough to keep every hypothesis
finds the best-scored translation that trying them all finds; a decoder-only model continues
prompts of different lengths, batched, as it continues each alone."""

import itertools

import pytest
import torch
from torch import nn

from clusterlm.models import ModelArgs, create_model
from clusterlm.models.seq2seq import DecodingCache
from clusterlm.train.decoding import Search, beam_decode, greedy_decode
from clusterlm.train.generate import beam_generate

EOT = 11


def tiny_model() -> nn.Module:
    """Sharper than its initialization, the end-of-text token's logit held at 0: translations of
    several tokens that differ between sources."""
    torch.manual_seed(0)
    args = ModelArgs(flavour="mbart", vocab_size=12, block_size=8, n_layer=1, n_head=2,
                     n_kv_head=2, n_embd=16, ffn_hidden=32)  # fmt: skip
    model = create_model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
        model.tok_embeddings.weight[EOT] = 0
    return model


def sources() -> torch.Tensor:
    rows = torch.randint(0, EOT, (3, 5), generator=torch.Generator().manual_seed(2))
    rows[1, 3:] = -1  # a padded source
    return rows


def test_a_beam_of_one_is_greedy():
    model, src = tiny_model(), sources()
    greedy = greedy_decode(model, src, EOT, max_len=8)
    assert (greedy >= 0).sum() > 10  # translations, not empty rows
    torch.testing.assert_close(beam_decode(model, src, EOT, 8, beam=1), greedy)


def test_batched_beam_search_equals_one_row_at_a_time():
    model, src = tiny_model(), sources()
    batched = beam_decode(model, src, EOT, 8, beam=3, length_penalty=0.8)
    assert not torch.equal(batched, greedy_decode(model, src, EOT, 8))
    for row in range(len(src)):
        alone = beam_decode(model, src[row : row + 1], EOT, 8, beam=3, length_penalty=0.8)
        torch.testing.assert_close(alone[0], batched[row])


class TableModel(nn.Module):
    """Next-token logits from a random table by (source row, position, previous token): the
    search's inputs without a network. The source's first token names its row of the table, so a
    beam that lost track of its source would read the wrong scores."""

    def __init__(self, rows: int, max_len: int, vocab: int):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.logits = 2 * torch.randn(rows, max_len, vocab, vocab, generator=generator)

    def forward(self, tokens: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        logits = self.logits[cache.source[:, 0], cache.length, tokens[:, -1]]
        cache.length += 1
        return logits[:, None]

    def score(self, row: int, tokens: list[int], eot: int, penalty: float) -> float:
        """Log-probability of ``tokens`` (then ``eot``, unless they fill the length) / length **
        ``penalty``, the length counting the end-of-text token."""
        steps = tokens + [eot] if len(tokens) < self.logits.size(1) else tokens
        previous, total = eot, 0.0
        for position, token in enumerate(steps):
            total += float(self.logits[row, position, previous].log_softmax(-1)[token])
            previous = token
        return total / len(steps) ** penalty


def test_a_beam_wider_than_every_hypothesis_finds_the_exhaustive_best():
    """3 words and the end-of-text token, at most 3 tokens: 40 hypotheses, all kept by a beam of
    64; the best by log-probability / length ** 0.7 among all of them."""
    eot, penalty, rows = 3, 0.7, 4
    table = TableModel(rows, 3, 4)
    found = beam_decode(table, torch.arange(rows)[:, None], eot, 3, beam=64, length_penalty=penalty)
    results = set()
    for row in range(rows):
        every = [list(w) for n in range(4) for w in itertools.product(range(3), repeat=n)]
        best = max(every, key=lambda tokens: table.score(row, tokens, eot, penalty))
        assert found[row][found[row] >= 0].tolist() == best
        results.add(tuple(best))
    assert len(results) > 1 and any(len(r) > 1 for r in results)


def tiny_decoder(flavour: str) -> nn.Module:
    torch.manual_seed(0)
    args = ModelArgs(flavour=flavour, vocab_size=12, block_size=16, n_layer=1, n_head=2,
                     n_kv_head=2, n_embd=16, ffn_hidden=32)  # fmt: skip
    model = create_model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_prompts_of_different_lengths_continue_as_each_alone(flavour):
    """Batched prompts of different lengths, keys and values cached, give each row what it gets
    alone without a cache: greedy the argmax of each step, and beam search what `clusterlm
    generate --beam` gives."""
    model = tiny_decoder(flavour)
    prompts = torch.randint(0, EOT, (3, 6), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([2, 6, 4])
    greedy = Search().continue_prompts(model, prompts, lengths, EOT, 8, lambda done: done)
    beams = Search(3).continue_prompts(model, prompts, lengths, EOT, 8, lambda done: done)
    for row in range(3):
        alone = prompts[row, : lengths[row]].tolist()
        tokens: list[int] = []
        while len(tokens) < 8:
            token = int(model(torch.tensor([alone + tokens]))[0, -1].argmax())
            if token == EOT:
                break
            tokens.append(token)
        assert greedy[row][greedy[row] >= 0].tolist() == tokens
        expected = beam_generate(model, alone, 8, 3, eot_id=EOT)
        assert beams[row][beams[row] >= 0].tolist() == expected
    assert (greedy >= 0).sum() > 6


def test_continuing_prompts_keeps_no_autograd_graph():
    """Evaluation calls the search with gradients enabled (the model is training's); a graph kept
    across the steps' cached keys and values grew a beam-4 search of a test split past 20 GiB."""
    model = tiny_decoder("gpt2")
    grad_enabled: list[bool] = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    prompts, lengths = torch.randint(0, EOT, (2, 4)), torch.tensor([4, 2])
    for beam in (1, 3):
        Search(beam).continue_prompts(model, prompts, lengths, EOT, 5, lambda done: done)
    assert grad_enabled and not any(grad_enabled)
