"""Beam search for decoder-only generation reuses the encoder-decoder's (``beam_search``): a beam
of one is greedy sampling up to the end-of-text token, a beam wide enough to keep every
hypothesis finds the best-scored continuation that trying them all finds, and an exported model's
``generate`` in transformers gives the same tokens."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from hf_models import reader
from torch import nn

from clusterlm.data.tokenizer import Tokenizer
from clusterlm.interop import export_hf
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


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_beam_search_is_that_of_transformers_generate(flavour, tmp_path):
    """Exported, the same model gives the same tokens under ``generate(num_beams=...,
    early_stopping=True)``, an end-of-text token reached or the length limit."""
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.char(["abcdefghij"])
    torch.manual_seed(1)
    args = ModelArgs(flavour=flavour, vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2,
                     n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32)  # fmt: skip
    model = create_model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3 if p.dim() > 1 else 1)
    export_hf(tmp_path / "hf", args, reader(model), tokenizer.to_json())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    eot, ended = 3, 0
    for prompt, beam, penalty in (([1, 2, 4], 3, 1.0), ([5], 4, 0.6), ([7, 0], 2, 1.4)):
        ours = beam_generate(model, prompt, 10, beam, penalty, eot)
        out = theirs.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=beam, length_penalty=penalty, early_stopping=True, max_new_tokens=10,
            do_sample=False, eos_token_id=eot, pad_token_id=eot,
        )[0, len(prompt) :].tolist()  # fmt: skip
        ended += eot in out
        assert ours == (out[: out.index(eot)] if eot in out else out)
    assert 0 < ended < 3  # some end at the end-of-text token, some at the length limit
