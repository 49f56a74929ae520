"""A packed window with document masking equals its documents run one by one."""

import pytest
import torch

from clusterlm.data.packing import Packing
from clusterlm.models.attention import document_mask, local_attention
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel.packed_inputs import ModelInputs

SEP, VOCAB, SEQ = 10, 11, 24


def _model(flavour: str) -> Transformer:
    torch.manual_seed(0)
    kv_heads = 1 if flavour == "llama" else 2  # llama: grouped-query attention too
    args = ModelArgs(
        flavour=flavour,
        vocab_size=VOCAB,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_kv_head=kv_heads,
        n_embd=16,
        ffn_hidden=32,
    )
    return Transformer(args).double()


def _windows() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randint(0, SEP, (2, SEQ + 1))
    x[0, [4, 11]] = SEP  # three documents, the last cut by the window's end
    x[1, 15] = SEP
    return x


def _documents(row: torch.Tensor) -> list[tuple[int, int]]:
    ends = [i + 1 for i, t in enumerate(row.tolist()) if t == SEP and i + 1 < len(row)]
    bounds = [0, *ends, len(row)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("reset", [False, True])
def test_packed_window_equals_documents_one_by_one(flavour, reset):
    model, window = _model(flavour), _windows()
    x, y = window[:, :-1], window[:, 1:]
    x, y, inputs = ModelInputs(Packing(SEP, True, reset))(x, y)
    packed = model(x, **inputs)
    separate = torch.empty_like(packed)
    for b in range(len(x)):
        for start, end in _documents(x[b]):
            # Without position_reset a document keeps the positions it has in the window.
            positions = None if reset else torch.arange(start, end)
            separate[b, start:end] = model(x[b : b + 1, start:end], positions=positions)[0]
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        next_token_loss(packed, y), next_token_loss(separate, y), rtol=0, atol=1e-5
    )
    # The mask matters: attention across the documents gives other logits.
    assert (model(x) - packed).abs().max() > 1e-3


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_flex_block_mask_equals_the_boolean_fallback(flavour):
    """Forward only: on a CPU torch runs flex attention without a backward."""
    model, x = _model(flavour).requires_grad_(False), _windows()[:, :-1]
    fallback = ModelInputs(Packing(SEP, True, True), use_flex=False)(x, x)[2]
    flex = ModelInputs(Packing(SEP, True, True), use_flex=True)(x, x)[2]
    torch.testing.assert_close(model(x, **flex), model(x, **fallback), rtol=0, atol=1e-5)


def test_the_document_mask_is_causal_inside_each_document():
    documents = torch.tensor([[0, 0, 1, 1]])
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(document_mask(documents, use_flex=False)[0, 0], expected)


def test_one_document_is_plain_causal_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    mask = document_mask(torch.zeros(1, 8, dtype=torch.long), use_flex=False)
    torch.testing.assert_close(
        local_attention(q, k, v, mask, causal=True), local_attention(q, k, v, None, causal=True)
    )
