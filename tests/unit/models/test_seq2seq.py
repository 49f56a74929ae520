"""The encoder–decoder: shapes, exact counts, cached decoding, padding, and the same logits as
Hugging Face's mBART with the same weights."""

import dataclasses

import pytest
import torch

from clusterlm.models import ModelArgs, create_model, param_count, training_flops_per_token
from clusterlm.models.counting import matmul_params
from clusterlm.models.seq2seq import DecodingCache, Seq2SeqTransformer, decoder_depth

ARGS = ModelArgs(
    flavour="mbart", vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
    ffn_hidden=64,
)  # fmt: skip
# mBART's encoder_layers and decoder_layers may differ, either way
DEEP_ENCODER = dataclasses.replace(ARGS, n_layer=3, decoder_layers=1)
DEEP_DECODER = dataclasses.replace(ARGS, n_layer=1, decoder_layers=3)
DEPTHS = pytest.mark.parametrize(
    "args", [ARGS, DEEP_ENCODER, DEEP_DECODER], ids=["2+2", "3+1", "1+3"]
)


def model(args: ModelArgs = ARGS) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    built = create_model(args)
    assert isinstance(built, Seq2SeqTransformer)
    return built.eval()


def rows(batch: int = 3) -> torch.Tensor:
    """Source then decoder input, the first row padded on both sides."""
    x = torch.randint(
        0, ARGS.vocab_size, (batch, 2 * ARGS.block_size), generator=torch.Generator().manual_seed(1)
    )
    x[0, 10:16] = -1
    x[0, 16 + 12 :] = -1
    return x


def test_forward_gives_logits_of_every_decoder_position():
    assert model()(rows()).shape == (3, ARGS.block_size, ARGS.vocab_size)


@DEPTHS
def test_counts_equal_the_parameters(args):
    m = model(args)
    blocks = [name[:3] for name in m.layers]
    assert (blocks.count("enc"), blocks.count("dec")) == (args.n_layer, args.decoder_layers or 2)
    assert param_count(args) == sum(p.numel() for p in m.parameters()) == m.num_params()
    lookups = m.enc_positions.weight.numel() + m.dec_positions.weight.numel()
    assert matmul_params(args) == m.num_params() - lookups
    # attention over the source in each encoder block, over the target and across in each decoder's
    attentions = blocks.count("enc") + 2 * blocks.count("dec")
    expected = 6 * matmul_params(args) + 12 * args.n_embd * 16 * attentions
    assert training_flops_per_token(args, 16) == expected


def test_built_on_meta_it_holds_no_values():
    with torch.device("meta"):
        m = create_model(ARGS)
    assert all(p.is_meta for p in m.parameters())


@DEPTHS
def test_cached_decoding_equals_the_full_forward(args):
    m, x = model(args), rows()
    with torch.no_grad():
        full = m(x)
        cache = DecodingCache(x[:, : ARGS.block_size])
        steps = [m(x[:, 16 + i : 17 + i], cache) for i in range(ARGS.block_size)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_of_the_real_tokens():
    m, x = model(), rows()
    alone = torch.cat([x[:1, :10], x[:1, 16:28]], dim=1)  # row 0 without its padding
    with torch.no_grad():
        padded = m(x)[0, :12]
        source = torch.full((1, 16), -1)
        source[0, :10] = alone[0, :10]
        target = torch.full((1, 16), -1)
        target[0, :12] = alone[0, 10:]
        torch.testing.assert_close(m(torch.cat([source, target], 1))[0, :12], padded)
        memory, mask = m.encode(alone[:, :10])
        torch.testing.assert_close(
            m.decode(alone[:, 10:], memory, mask)[0], padded, atol=1e-5, rtol=1e-5
        )


def hf_mbart(ours: Seq2SeqTransformer):
    """``transformers``' mBART with our weights (its position tables start two rows in)."""
    transformers = pytest.importorskip("transformers")
    a = ours.args
    config = transformers.MBartConfig(
        vocab_size=a.vocab_size, d_model=a.n_embd, encoder_layers=a.n_layer,
        decoder_layers=decoder_depth(a), encoder_attention_heads=a.n_head,
        decoder_attention_heads=a.n_head, encoder_ffn_dim=a.ffn_hidden,
        decoder_ffn_dim=a.ffn_hidden, max_position_embeddings=a.block_size,
        activation_function="gelu_pytorch_tanh", dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, scale_embedding=False, pad_token_id=1, layer_norm_eps=a.norm_eps,
    )  # fmt: skip
    hf = transformers.MBartForConditionalGeneration(config).eval()
    state = {"model.shared.weight": ours.tok_embeddings.weight}
    for side, positions, emb_norm, norm in (
        ("encoder", ours.enc_positions, ours.enc_emb_norm, ours.enc_norm),
        ("decoder", ours.dec_positions, ours.dec_emb_norm, ours.dec_norm),
    ):
        table = torch.cat([torch.zeros(2, a.n_embd), positions.weight])
        state[f"model.{side}.embed_positions.weight"] = table
        for name, module in (("layernorm_embedding", emb_norm), ("layer_norm", norm)):
            state |= {f"model.{side}.{name}.{k}": v for k, v in module.state_dict().items()}
    parts = {"attn_norm": "self_attn_layer_norm", "cross_norm": "encoder_attn_layer_norm",
             "mlp_norm": "final_layer_norm", "mlp.w1": "fc1", "mlp.w2": "fc2"}  # fmt: skip
    projections = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "out_proj"}
    for key, value in ours.layers.state_dict().items():
        layer, rest = key.split(".", 1)
        side, index = ("encoder", layer[3:]) if layer.startswith("enc") else ("decoder", layer[3:])
        module, kind = rest.rsplit(".", 1)
        if module.startswith(("attn.", "cross.")):
            which, proj = module.split(".")
            module = f"{'self_attn' if which == 'attn' else 'encoder_attn'}.{projections[proj]}"
        else:
            module = parts[module]
        state[f"model.{side}.layers.{index}.{module}.{kind}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    assert not unexpected and set(missing) <= tied | {"lm_head.weight", "final_logits_bias"}
    return hf


@DEPTHS
def test_logits_equal_hugging_face_mbart(args):
    ours, x = model(args), rows()
    hf = hf_mbart(ours)
    source, target = x[:, :16], x[:, 16:]
    with torch.no_grad():
        theirs = hf(
            input_ids=source.clamp(min=0), attention_mask=(source >= 0).long(),
            decoder_input_ids=target.clamp(min=0),
        ).logits  # fmt: skip
        torch.testing.assert_close(ours(x), theirs, atol=1e-5, rtol=1e-5)
