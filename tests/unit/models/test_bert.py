"""The bert encoder (shapes, bidirectionality, exact counts, meta-device build) and BERT's masking
rule."""

import pytest
import torch

from clusterlm.config import build_config
from clusterlm.data.masking import IGNORE_INDEX, MaskingRule
from clusterlm.data.special_tokens import SPECIAL_TOKENS, special_token_id
from clusterlm.errors import UserError
from clusterlm.models import Encoder, ModelArgs, create_model, param_count, training_flops_per_token
from clusterlm.models.counting import matmul_params
from clusterlm.models.init import seeded_source
from clusterlm.parallel.materialize import materialize

ARGS = ModelArgs(
    flavour="bert",
    vocab_size=50,
    block_size=16,
    n_layer=2,
    n_head=4,
    n_kv_head=4,
    n_embd=32,
    ffn_hidden=128,
)
ROWS = ARGS.vocab_size + len(SPECIAL_TOKENS)


def test_logits_cover_the_vocabulary_and_its_special_tokens():
    model = create_model(ARGS)
    assert isinstance(model, Encoder)
    tokens = torch.randint(0, ROWS, (3, ARGS.block_size))
    assert model(tokens).shape == (3, ARGS.block_size, ROWS)
    assert model.mask_id == ARGS.vocab_size == special_token_id(ARGS.vocab_size, "[MASK]")
    assert model.head.output.weight is model.tok_embeddings.weight
    assert model.head.output.bias is not None


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    model = create_model(ARGS).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, ARGS.block_size))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % ARGS.vocab_size  # only the last token differs
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first token sees the last


def test_padding_is_never_attended_to():
    torch.manual_seed(0)
    model = create_model(ARGS).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 8))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % ARGS.vocab_size
    mask = torch.tensor([[True] * 6 + [False] * 2])
    with torch.no_grad():
        a, b = model(tokens, padding_mask=mask), model(changed, padding_mask=mask)
    torch.testing.assert_close(a[:, :6], b[:, :6])


def test_param_and_flop_counts_are_exact():
    model = create_model(ARGS)
    assert param_count(ARGS) == model.num_params() == sum(p.numel() for p in model.parameters())
    lookups = (ARGS.block_size + 2) * ARGS.n_embd  # positions and token types
    assert matmul_params(ARGS) == param_count(ARGS) - lookups
    seq = ARGS.block_size
    assert (
        training_flops_per_token(ARGS, seq)
        == 6 * matmul_params(ARGS) + 12 * ARGS.n_layer * ARGS.n_embd * seq
    )


def test_bert_base_parameter_count():
    """BERT-base (uncased, 30,522 tokens) has 109,482,240 parameters without its pooler and with
    the masked-LM head's transform and bias; here the four special tokens add 4 rows + 4 biases."""
    args = ModelArgs(
        flavour="bert",
        vocab_size=30522 - 4,
        block_size=512,
        n_layer=12,
        n_head=12,
        n_kv_head=12,
        n_embd=768,
        ffn_hidden=3072,
    )
    pooler = 768 * 768 + 768
    mlm_head = 768 * 768 + 768 + 2 * 768 + 30522
    assert param_count(args) == 109_482_240 - pooler + mlm_head


def test_meta_build_materializes_to_the_eager_initialization():
    eager = create_model(ARGS)
    eager.reset_parameters(seed=5)
    with torch.device("meta"):
        meta = create_model(ARGS)
    materialize(meta, seeded_source(meta.init_rule, 5), torch.device("cpu"))
    assert meta.head.output.weight is meta.tok_embeddings.weight
    for (name, a), (_, b) in zip(eager.named_parameters(), meta.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


RULE = MaskingRule(seed=3, probability=0.15, mask_id=50, vocab_size=50)


def test_masking_follows_berts_80_10_10_rule():
    tokens = torch.randint(0, 50, (2000, 40))
    inputs, labels = RULE.apply(tokens, range(2000))
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == 6).all()  # round(0.15 * 40) per sequence, exactly
    torch.testing.assert_close(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    masked = (inputs[chosen] == 50).float().mean().item()
    kept = (
        (inputs[chosen] == tokens[chosen]).float().mean().item()
    )  # 10% kept + 1/50 of the random 10%
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 50, abs=0.01)
    assert inputs.max() <= 50


def test_mask_is_a_function_of_seed_and_sample_only():
    tokens = torch.randint(0, 50, (8, 32))
    whole = RULE.apply(tokens, range(100, 108))
    halves = [RULE.apply(tokens[:4], range(100, 104)), RULE.apply(tokens[4:], range(104, 108))]
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([halves[0][i], halves[1][i]]))
    other_seed = MaskingRule(4, 0.15, 50, 50).apply(tokens, range(100, 108))
    assert not torch.equal(whole[1], other_seed[1])
    assert not torch.equal(whole[1], RULE.apply(tokens, range(108, 116))[1])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model.flavour": "bert"}, "bert trains with training.objective = mlm"),
        ({"training.objective": "mlm"}, "gpt2 trains with training.objective = clm"),
        (
            {"model.flavour": "bert", "training.objective": "mlm", "parallel.pp": 2},
            "no pipeline or sequence-parallel",
        ),
        (
            {"model.flavour": "bert", "training.objective": "mlm", "training.mlm_probability": 1.5},
            "mlm_probability",
        ),
    ],
)
def test_objective_and_flavour_must_agree(values, message):
    with pytest.raises(UserError, match=message):
        build_config(None, values)
