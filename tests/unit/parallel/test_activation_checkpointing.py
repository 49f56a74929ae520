"""Activation checkpointing: what backward recomputes under each mode, and unchanged gradients."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from clusterlm.models import ModelArgs, Transformer
from clusterlm.parallel.activation_checkpointing import (
    _save_expensive_ops,
    apply_activation_checkpointing,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str) -> Counter:
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(
            flavour="llama",
            vocab_size=64,
            block_size=32,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            ffn_hidden=192,
        )
    )
    if mode != "none":
        apply_activation_checkpointing(model, mode)
    loss = model(torch.randint(0, 64, (4, 32))).logsumexp(-1).mean()
    with CountOps() as counter:
        loss.backward()
    return counter.counts


def test_full_recomputes_blocks_and_selective_only_the_cheap_ops():
    none, selective, full = backward_ops("none"), backward_ops("selective"), backward_ops("full")
    # full replays each block's forward: its matmuls and element-wise ops run again in backward
    assert full["mm"] > none["mm"] and full["silu"] > none["silu"]
    # selective keeps matmul and attention outputs and recomputes only the element-wise ops
    assert selective["mm"] == none["mm"] and selective["silu"] > none["silu"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_unchanged(mode, device):
    """With dropout on, so the recompute must draw the forward's masks again (on CUDA attention
    draws its own dropout inside one kernel)."""
    grads = {}
    for m in ("none", mode):
        torch.manual_seed(0)
        model = Transformer(
            ModelArgs(
                flavour="gpt2",
                vocab_size=64,
                block_size=16,
                n_layer=2,
                n_head=2,
                n_kv_head=2,
                n_embd=32,
                ffn_hidden=64,
                dropout=0.1,
            )
        ).to(device)
        if m != "none":
            apply_activation_checkpointing(model, m)
        torch.manual_seed(1)
        model(torch.randint(0, 64, (2, 16), device=device)).square().mean().backward()
        grads[m] = {
            n.replace("._checkpoint_wrapped_module", ""): p.grad
            for n, p in model.named_parameters()
        }
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-7)


def test_selective_recomputes_attention_that_draws_dropout():
    """A saved random op does not draw again in the recompute, which would shift every later
    dropout mask; attention with dropout is recomputed, without it saved."""
    q = torch.randn(1, 2, 8, 4)
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention.default
    flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    recompute, save = CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_SAVE
    assert _save_expensive_ops(None, efficient, q, q, q, None, False, 0.1) == recompute
    assert _save_expensive_ops(None, efficient, q, q, q, None, False, dropout_p=0.1) == recompute
    assert _save_expensive_ops(None, efficient, q, q, q, None, False, 0.0) == save
    assert _save_expensive_ops(None, efficient, q, q, q, None, False) == save
    assert _save_expensive_ops(None, flash_cpu, q, q, q, 0.1) == recompute
    assert _save_expensive_ops(None, torch.ops.aten.mm.default, q[0, 0], q[0, 0].T) == save
