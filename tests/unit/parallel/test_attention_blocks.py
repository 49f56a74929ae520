"""Blocks of attention with their log-sum-exp: the fused CPU kernel and the explicit matmuls
(what other devices run) agree, and merging blocks gives whole attention."""

import math

import pytest
import torch

from clusterlm.models.attention import local_attention
from clusterlm.parallel import attention_blocks
from clusterlm.parallel.attention_blocks import block_backward, block_forward

B, H, KV, T, D = 2, 4, 2, 12, 8


def _qkv():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, KV, T, D, generator=generator, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(B, 1, T, T, generator=generator) < 0.5
    allowed[:, :, 3] = False  # a query that reads nothing of the block
    return q, k, v, allowed


@pytest.mark.parametrize("mask", ["allowed", "causal", "whole"])
def test_fused_kernel_equals_matmuls(mask, monkeypatch):
    q, k, v, allowed = _qkv()
    visible = {"allowed": (allowed, False), "causal": (None, True), "whole": (None, False)}[mask]
    fused = block_forward(q, k, v, *visible)
    grad = torch.randn_like(q)
    fused_grads = block_backward(grad, q, k, v, fused[0], fused[1].nan_to_num(neginf=0.0), *visible)
    monkeypatch.setattr(attention_blocks, "fused", lambda q: False)
    explicit = block_forward(q, k, v, *visible)
    explicit_grads = block_backward(
        grad, q, k, v, explicit[0], explicit[1].nan_to_num(neginf=0.0), *visible
    )
    for got, want in zip((*fused, *fused_grads), (*explicit, *explicit_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if mask == "allowed":
        assert fused[1][:, :, 3].eq(-math.inf).all() and fused[0][:, :, 3].eq(0).all()


def test_two_blocks_merged_by_log_sum_exp_are_whole_attention():
    q, k, v, _ = _qkv()
    half = T // 2
    first = block_forward(q, k[:, :, :half], v[:, :, :half], None, False)
    second = block_forward(q, k[:, :, half:], v[:, :, half:], None, False)
    lse = torch.logaddexp(first[1], second[1])
    out = first[0] * torch.exp(first[1] - lse).unsqueeze(-1) + second[0] * torch.exp(
        second[1] - lse
    ).unsqueeze(-1)
    torch.testing.assert_close(
        out, local_attention(q, k, v, None, causal=False), rtol=0, atol=1e-10
    )
