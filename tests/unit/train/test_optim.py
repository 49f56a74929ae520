"""Weight-decay groups, the LR schedule, and LocalAdamW against torch's AdamW on plain tensors
(bit for bit; on DTensors: tests/dist/test_fsdp_comm.py)."""

import pytest

from clusterlm.config import OptimConfig
from clusterlm.models import ModelArgs, Transformer
from clusterlm.train.optim import lr_at, optimizer_recipe


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_only_linear_weights_are_decayed(flavour):
    model = Transformer(
        ModelArgs(
            flavour=flavour,
            vocab_size=20,
            block_size=8,
            n_layer=2,
            n_head=2,
            n_kv_head=2,
            n_embd=16,
            ffn_hidden=32,
        )
    )
    decay, no_decay = optimizer_recipe(model, OptimConfig(weight_decay=0.1)).build().param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(
        n.endswith(".weight") and ("attn.w" in n or "mlp.w" in n or n == "output.weight")
        for n in decayed
    )
    assert not any("norm" in n or "embeddings" in n or n.endswith(".bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 100) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_linear_and_constant_decay():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear", decay_steps=50)
    assert lr_at(25, linear, 1000) == pytest.approx(0.5)
    assert lr_at(50, linear, 1000) == pytest.approx(0.0)
    constant = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0, decay="constant")
    assert lr_at(999, constant, 10) == 2.0
