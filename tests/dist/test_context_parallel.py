"""Ring and all-to-all attention over a context-parallel group equal one process's attention:
outputs and the gradients of q, k and v, with and without document masks (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from clusterlm.data.packing import document_ids
from clusterlm.models.attention import document_mask, local_attention
from clusterlm.parallel.ring_attention import (
    all_to_all_attention,
    ring_attention,
    zigzag_positions,
)

from .helpers import run_distributed

BATCH, HEADS, KV_HEADS, SEQ, DIM, SEP = 2, 4, 2, 32, 8, 0


def _inputs(documents: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    tokens = torch.randint(0, 6, (BATCH, SEQ), generator=generator)
    if not documents:
        tokens[tokens == SEP] = 1
    grad = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    return q, k, v, document_ids(tokens, SEP), grad


def _attend(rank: int, world_size: int, kind: str, documents: bool) -> tuple[torch.Tensor, ...]:
    q, k, v, docs, grad = _inputs(documents)
    share = zigzag_positions(SEQ // world_size, rank, world_size, q.device)
    q, k, v = (t[:, :, share].clone().requires_grad_() for t in (q, k, v))
    group = dist.group.WORLD
    if kind == "ring":
        out = ring_attention(q, k, v, docs if documents else None, True, group=group)
    else:
        mask = document_mask(docs, use_flex=False) if documents else None
        out = all_to_all_attention(q, k, v, mask, True, group=group)
    out.backward(grad[:, :, share])
    return share, out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["ring", "all_to_all"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_context_parallel_attention_equals_one_process(world_size, kind, documents):
    q, k, v, docs, grad = _inputs(documents)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = document_mask(docs, use_flex=False) if documents else None
    expected = local_attention(q, k, v, mask, causal=True)
    expected.backward(grad)
    for share, out, dq, dk, dv in run_distributed(_attend, world_size, kind, documents, timeout=120):
        for got, want in ((out, expected), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
            torch.testing.assert_close(got, want.detach()[:, :, share], rtol=0, atol=1e-10)
