"""The bytes context-parallel attention sends, counted by ``bench train``'s recorder in a real run
on 2 and 4 processes, equal the planner's formula (``clusterlm.plan.context_comm``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from clusterlm.models.gpt import ModelArgs
from clusterlm.parallel.attention_traffic import recording
from clusterlm.parallel.ring_attention import all_to_all_attention, ring_attention
from clusterlm.plan.context_comm import exchanges_per_layer, sent_bytes_per_layer
from clusterlm.plan.layout import Layout
from clusterlm.plan.workload import Workload

from .helpers import run_distributed

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 4, 2, 32, 8


def _sent(rank: int, world_size: int, kind: str) -> tuple[float, float, int]:
    generator = torch.Generator().manual_seed(rank)
    local = SEQ // world_size
    q = torch.randn(BATCH, HEADS, local, DIM, generator=generator, requires_grad=True)
    k, v = (
        torch.randn(BATCH, KV_HEADS, local, DIM, generator=generator, requires_grad=True)
        for _ in range(2)
    )
    attend = ring_attention if kind == "ring" else all_to_all_attention
    with recording() as traffic:
        out = attend(q, k, v, None, True, group=dist.group.WORLD)
        out.sum().backward()
    untimed = traffic.seconds
    out = attend(q, k, v, None, True, group=dist.group.WORLD)  # outside: nothing recorded
    return traffic.bytes_sent, traffic.seconds - untimed, traffic.exchanges


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["ring", "all_to_all"])
def test_bytes_sent_equal_the_planners_count(world_size, kind):
    args = ModelArgs(
        flavour="llama", vocab_size=16, block_size=SEQ, n_layer=1, n_head=HEADS,
        n_kv_head=KV_HEADS, n_embd=HEADS * DIM, ffn_hidden=64, dropout=0.0,
    )  # fmt: skip
    work = Workload(args, SEQ, BATCH * SEQ, "fp32")
    layout = Layout(cp=world_size, cp_attention=kind, micro_batch_size=BATCH)
    for sent, after, exchanges in run_distributed(_sent, world_size, kind, timeout=120):
        assert sent == pytest.approx(sent_bytes_per_layer(work, layout))
        assert after == 0.0
        if kind == "ring":  # the point-to-point exchanges the planner prices
            assert exchanges == exchanges_per_layer(layout)
