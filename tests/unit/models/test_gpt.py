"""Model shapes, causality, initialisation and exact parameter/FLOP counts."""

import math

import pytest
import torch

from clusterlm.models import ModelArgs, Transformer, param_count, training_flops_per_token
from clusterlm.models.counting import matmul_params

FLAVOURS = {
    "gpt2": ModelArgs(
        flavour="gpt2",
        vocab_size=50,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=4,
        n_embd=32,
        ffn_hidden=128,
    ),
    "llama": ModelArgs(
        flavour="llama",
        vocab_size=50,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        ffn_hidden=96,
    ),
}


@pytest.fixture(params=list(FLAVOURS))
def args(request):
    return FLAVOURS[request.param]


def test_logits_shape(args):
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (3, args.block_size))
    assert model(tokens).shape == (3, args.block_size, args.vocab_size)


def test_shorter_sequences_and_too_long_rejected(args):
    model = Transformer(args)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, args.vocab_size)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, args.block_size + 1, dtype=torch.long))


def test_causality_future_tokens_never_change_earlier_logits(args):
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, args.block_size))
    changed = tokens.clone()
    cut = 7
    changed[:, cut:] = torch.randint(0, args.vocab_size, changed[:, cut:].shape)
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=0)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_param_count_formula_matches_real_parameters(args):
    model = Transformer(args)
    assert param_count(args) == model.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_param_count_of_known_models(flavour):
    if flavour == "gpt2":  # GPT-2 small: 124,439,808 parameters with the 50,257-token vocabulary
        args = ModelArgs(
            flavour="gpt2",
            vocab_size=50257,
            block_size=1024,
            n_layer=12,
            n_head=12,
            n_kv_head=12,
            n_embd=768,
            ffn_hidden=3072,
        )
        assert param_count(args) == 124_439_808
    else:  # Llama-3-8B: 8,030,261,248 parameters
        args = ModelArgs(
            flavour="llama",
            vocab_size=128256,
            block_size=8192,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            n_embd=4096,
            ffn_hidden=14336,
        )
        assert param_count(args) == 8_030_261_248


def test_gpt2_ties_embeddings_and_llama_does_not():
    gpt2, llama = Transformer(FLAVOURS["gpt2"]), Transformer(FLAVOURS["llama"])
    assert gpt2.output.weight is gpt2.tok_embeddings.weight
    assert llama.output.weight is not llama.tok_embeddings.weight
    assert all(m.bias is None for m in llama.modules() if isinstance(m, torch.nn.Linear))


def test_flops_per_token_is_6n_plus_attention(args):
    seq = args.block_size
    expected = 6 * matmul_params(args) + 12 * args.n_layer * args.n_embd * seq
    assert training_flops_per_token(args, seq) == expected


def test_residual_projections_are_scaled_at_init():
    args = ModelArgs(
        flavour="gpt2",
        vocab_size=64,
        block_size=8,
        n_layer=8,
        n_head=4,
        n_kv_head=4,
        n_embd=256,
        ffn_hidden=1024,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    block = model.layers["0"]
    assert block.mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.attn.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_initial_loss_is_near_uniform(args):
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (4, args.block_size))
    targets = torch.randint(0, args.vocab_size, (4, args.block_size))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(math.log(args.vocab_size), rel=0.1)


def test_grouped_query_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    gqa_args = FLAVOURS["llama"]
    gqa = Transformer(gqa_args).eval()
    mha_args = ModelArgs(**{**gqa_args.__dict__, "n_kv_head": gqa_args.n_head})
    mha = Transformer(mha_args).eval()
    state = gqa.state_dict()
    group = gqa_args.n_head // gqa_args.n_kv_head
    for name in list(state):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            heads = state[name].view(gqa_args.n_kv_head, gqa_args.head_dim, -1)
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, gqa_args.n_embd)
    mha.load_state_dict(state)
    tokens = torch.randint(0, gqa_args.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens))


@pytest.mark.parametrize("kernel", ["auto", "math"])
def test_attention_kernels_agree(kernel):
    from clusterlm.models.gpt import attention_kernel

    args = ModelArgs(
        vocab_size=50, block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, ffn_hidden=64
    )
    torch.manual_seed(0)
    model, tokens = Transformer(args), torch.randint(0, 50, (2, 16))
    reference = model(tokens)
    with attention_kernel(kernel):
        assert torch.allclose(model(tokens), reference, atol=1e-5)
