"""The rates one CPU thread reaches on a training step's two kinds of multiply, at the step's own
shapes and precision: the linear layers (QKV, output projection, MLP, head) and the attention core,
each forward and backward.

``plan --validate`` describes its local devices by them, because a CPU's large-matrix peak says
little about a small model's step, and the two kinds part ways by precision: bf16 may speed the
linear layers up and slow short-sequence attention down
(benchmarks/kernel-rates-cpu-epyc-zen4-2026-12-01.md). Rates count the planner's FLOPs
(``clusterlm.plan.efficiency``: the attention core over the full s x s), so they divide its FLOP
counts back into seconds; ``relative_kernel_rates`` anchors them to the matmul probe.

The probes run the case's own kernels: a mixture of experts' routed experts through the grouped
multiply (``torch._grouped_mm`` where it runs) on their share of the tokens, its router and shared
experts as linear layers; ring attention's blocks as the ring computes them on its busiest rank
(the diagonal block causally, the others' visible halves whole, each a call of the fused kernel).
Beside them, ``elementwise_rates`` measures what the planner prices counted element-wise kernels
at (``clusterlm.plan.elementwise``): kernel calls per second and bytes per second;
``routing_rate`` a mixture of experts' routing calls per second, from its block timed whole;
``norm_rate`` the tokens per second of a block's norms and rotary positions; and
``ulysses_rate`` the layers per second of all-to-all attention's layout changes around its
exchanges. ``relative_kernel_rates`` adds the rates of the passes over every parameter
(``clusterlm.bench.parameter_rates``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clusterlm.bench.parameter_rates import fsdp_buffer_rate, optimizer_rate
from clusterlm.bench.probe_timing import best_seconds, one_thread
from clusterlm.models.gpt import apply_rotary, moe_mlp, norm_layer, rotary_tables
from clusterlm.models.moe import grouped_mm
from clusterlm.parallel.attention_blocks import block_backward, block_forward
from clusterlm.parallel.precision import DTYPES
from clusterlm.parallel.ring_attention import ulysses, visible_block
from clusterlm.plan.layout import Layout
from clusterlm.plan.moe_cost import expert_hidden, routing_kernels
from clusterlm.plan.workload import Workload


def kernel_rates(work: Workload, layout: Layout) -> dict[str, float]:
    """{"linear": FLOP/s, "attention": FLOP/s, "dense_linear": FLOP/s} of one thread on a
    micro-batch of ``layout``: the linear rate is the model's mix, n_layer blocks' linear layers
    (an MoE block's router, shared and routed experts) and the head once; the attention rate that
    of the case's attention; the dense linear rate the mix without the MoE blocks' MLPs, which
    ``relative_kernel_rates`` anchors."""
    args, s = work.model, work.seq_len
    tokens = layout.micro_batch_size * s // layout.cp
    compute = DTYPES[work.precision]
    q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    mlp_in = (2 if args.is_llama else 1) * args.ffn_hidden
    moe = len(args.moe_blocks(args.n_layer))
    attention = [(args.n_embd, q + 2 * kv), (q, args.n_embd)]
    dense = [(args.n_embd, mlp_in), (args.ffn_hidden, args.n_embd)]
    head = [(args.n_embd, args.vocab_size)]
    with one_thread():
        dense_s = args.n_layer * best_seconds(_linears(attention, tokens, compute))
        dense_s += (args.n_layer - moe) * best_seconds(_linears(dense, tokens, compute))
        dense_s += best_seconds(_linears(head, tokens, compute))
        moe_s = moe * best_seconds(_moe_mlp(work, tokens, compute)) if moe else 0.0
        attention_s = best_seconds(_attention(work, layout, compute))
    shapes = args.n_layer * attention + (args.n_layer - moe) * dense + head
    dense_flops = 6 * tokens * sum(k * n for k, n in shapes)
    moe_flops = 6 * tokens * moe * _moe_mlp_params(work)
    # One layer's attention, as the planner counts it: the full s x s for this rank's tokens.
    attention_flops = 6 * tokens * 2 * q * s
    return {
        "linear": (dense_flops + moe_flops) / (dense_s + moe_s),
        "attention": attention_flops / attention_s,
        "dense_linear": dense_flops / dense_s,
    }


def _moe_mlp_params(work: Workload) -> int:
    """Multiply-adds per token of an MoE block's MLP: router, k routed and the shared experts."""
    args = work.model
    experts = args.moe_top_k + args.moe_shared_experts
    return args.n_embd * args.moe_experts + experts * 3 * args.n_embd * expert_hidden(args)


def _moe_mlp(work: Workload, tokens: int, compute: torch.dtype) -> Callable[[], None]:
    """An MoE block's multiplies forward and backward: the router and shared experts as linear
    layers, the k routed copies of the tokens through the grouped multiply, spread evenly."""
    args = work.model
    d, hidden, experts = args.n_embd, expert_hidden(args), args.moe_experts
    shared = args.moe_shared_experts * hidden
    dense = [(d, experts)] + ([(d, 2 * shared), (shared, d)] if shared else [])
    linears = _linears(dense, tokens, compute)
    rows = tokens * args.moe_top_k
    counts = torch.full((experts,), rows // experts)
    counts[: rows % experts] += 1
    x = torch.randn(rows, d, dtype=compute, requires_grad=True)
    w1, w3 = (torch.randn(experts, d, hidden, dtype=compute, requires_grad=True) for _ in range(2))
    w2 = torch.randn(experts, hidden, d, dtype=compute, requires_grad=True)

    def run() -> None:
        linears()
        out = grouped_mm(grouped_mm(x, w1, counts) * grouped_mm(x, w3, counts), w2, counts)
        out.backward(torch.ones_like(out))

    return run


def _attention(work: Workload, layout: Layout, compute: torch.dtype) -> Callable[[], None]:
    """One layer's attention core forward and backward on a rank: one fused call over the whole
    sequence (under all-to-all attention for the rank's 1/cp of the heads), or ring attention's
    block calls on its last rank (``ring_attention.visible_block``)."""
    args, cp = work.model, layout.cp
    ring = cp > 1 and layout.cp_attention == "ring"
    local = work.seq_len // cp if ring else work.seq_len
    heads = args.n_head if ring else args.n_head // cp
    # Attention sees the QKV projection's output, already in the compute dtype.
    query, key, value = (
        torch.randn(layout.micro_batch_size, heads, local, args.head_dim, dtype=compute)
        for _ in range(3)
    )
    if not ring:
        for t in (query, key, value):
            t.requires_grad_()

        def whole() -> None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
            out.backward(torch.ones_like(out))

        return whole
    grad_out = torch.ones(query.shape)

    def blocks() -> None:
        for step in range(cp):
            rows, cols = visible_block(cp - 1, (cp - 1 - step) % cp, local // 2)
            q, k, v = query[:, :, rows], key[:, :, cols], value[:, :, cols]
            out, lse = block_forward(q, k, v, None, step == 0)
            block_backward(grad_out[:, :, rows], q, k, v, out, lse, None, step == 0)

    return blocks


def elementwise_rates(nbytes: int) -> dict[str, float]:
    """{"launch": kernel calls/s, "elementwise": bytes/s} of one thread, on the counted kernels'
    form (a slice of one tensor times another broadcast over its last dimension): on a few
    elements it is all launch, on a slice of ``nbytes`` of fp32 (read once, written once) its
    bytes take the rest of its time. ``nbytes`` is the size of the kernels' tensors, since the
    rate falls where they outgrow the caches."""
    tiny = (torch.ones(1, 2, 2), torch.ones(1, 1))
    big = (torch.ones(1, 2, max(1, nbytes // 4)), torch.ones(1, 1))
    with one_thread():
        launch_s = best_seconds(lambda: tiny[0][:, 1:] * tiny[1].unsqueeze(-1), calls=200)
        big_s = best_seconds(lambda: big[0][:, 1:] * big[1].unsqueeze(-1), calls=20)
    moved = 2 * 4 * big[0].size(-1)  # the slice read, the product written
    return {"launch": 1 / launch_s, "elementwise": moved / max(big_s - launch_s, 1e-9)}


def relative_kernel_rates(work: Workload, layout: Layout, fp32_peak: float) -> dict[str, float]:
    """``kernel_rates`` scaled so that fp32's dense linear layers run at ``fp32_peak`` (the matmul
    probe's): an isolated probe reads lower than the same kernels inside a training step (warm
    caches, reused allocations), so only its ratios are used, by kind and precision. A mixture of
    experts' MLPs keep their ratio to the dense layers: their many small groups of rows run well
    below the peak (benchmarks/moe-experts-ep4-cpu-xeon-2026-12-07.md). With the element-wise
    rates as measured, at the size of one of the micro-batch's activations."""
    rates = kernel_rates(work, layout)
    fp32 = (
        rates
        if work.precision == "fp32"
        else kernel_rates(dataclasses.replace(work, precision="fp32"), layout)
    )
    anchor = fp32["dense_linear"]
    scaled = {
        kind: rate / anchor * fp32_peak for kind, rate in rates.items() if kind != "dense_linear"
    }
    # The counted kernels' tensors: an fp32 activation of the rank's micro-batch, or larger.
    activation = layout.micro_batch_size * work.seq_len // layout.cp * work.model.n_embd * 4
    return {
        **scaled,
        **elementwise_rates(activation),
        **routing_rate(work, layout),
        **optimizer_rate(work),
        **norm_rate(work, layout),
        **ulysses_rate(work, layout),
        **(fsdp_buffer_rate(work, layout) if layout.uses_fsdp else {}),
    }


def ulysses_rate(work: Workload, layout: Layout) -> dict[str, float]:
    """{"ulysses": layers/s, "ulysses_forward": layers/s} of one thread on all-to-all
    attention's layout work in one layer, forward and backward, and forward alone, at a rank's
    shapes: q, k and v re-laid from a split of the sequence to a split of the heads (put in
    natural order by gathering positions), the output back, and the gradients the same ways,
    with an exchange that keeps the blocks where they are (the links and the probe of the waits
    price the exchange). Empty without all-to-all attention."""
    if layout.cp == 1 or layout.cp_attention != "all_to_all":
        return {}
    args, cp = work.model, layout.cp
    local = (layout.micro_batch_size, work.seq_len // cp, args.head_dim)
    heads = (args.n_head // layout.tp, args.n_head // layout.tp, args.n_kv_head // layout.tp)
    q, k, v = (
        torch.randn(local[0], h, *local[1:], dtype=DTYPES[work.precision]).requires_grad_()
        for h in heads
    )
    kept: list[torch.Tensor] = []

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kept.extend((k, v))  # their gradients flow back through their own layout changes
        return q

    def forward() -> list[torch.Tensor]:
        kept.clear()
        return [ulysses(q, k, v, cp, lambda blocks: blocks, attend), *kept]

    def both() -> None:
        outs = forward()
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    with one_thread():
        seconds, forward_s = best_seconds(both, calls=20), best_seconds(forward, calls=20)
    return {"ulysses": 1 / seconds, "ulysses_forward": 1 / forward_s}


def norm_rate(work: Workload, layout: Layout) -> dict[str, float]:
    """{"norms": tokens/s} of one thread on a block's two norms and, for llama, the rotary
    positions of its queries and keys, forward and backward, on a micro-batch of ``layout`` as
    the trainer's mixed precision runs them (the residual stream in fp32, q and k in the compute
    dtype). gpt2's norm is one fused kernel; llama's RMSNorm and rotation are several small ones
    each, so their cost per FLOP differs by flavour and one fitted efficiency cannot carry both."""
    args, seq = work.model, work.seq_len // layout.cp
    tokens = layout.micro_batch_size * seq
    compute = DTYPES[work.precision]
    norm = norm_layer(args)
    x = torch.randn(tokens, args.n_embd, requires_grad=True)
    heads = (args.n_head // layout.tp, max(1, args.n_kv_head // layout.tp))
    rotated = [
        torch.randn(layout.micro_batch_size, h, seq, args.head_dim, dtype=compute).requires_grad_()
        for h in (heads if args.is_llama else ())
    ]
    cos, sin = rotary_tables(args.head_dim, seq, args.rope_theta)

    def run() -> None:
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
            outs = [norm(x), norm(x), *(apply_rotary(t, cos, sin) for t in rotated)]
        torch.autograd.backward(outs, [torch.ones_like(out) for out in outs])

    with one_thread():
        seconds = best_seconds(run, calls=20)
    return {"norms": tokens / seconds}


def routing_rate(work: Workload, layout: Layout) -> dict[str, float]:
    """{"routing": kernel calls/s} of one thread on a mixture of experts' counted routing kernels
    (``moe_cost.routing_kernels``), from the MoE block itself forward and backward at the case's
    shapes less its multiplies alone: its many small indexing and sorting kernels cost more per
    call than the element-wise probe's. Empty for a dense model."""
    args = work.model
    if not args.moe_blocks(args.n_layer):
        return {}
    tokens = layout.micro_batch_size * work.seq_len // layout.cp
    compute = DTYPES[work.precision]
    calls, _ = routing_kernels(work, Layout(), tokens, r=4)
    with one_thread():
        # The difference of two timings: more calls than the other probes, to steady it.
        block_s, multiplies_s = (
            best_seconds(fn, calls=20, rounds=5)
            for fn in (_moe_block(work, tokens, compute), _moe_mlp(work, tokens, compute))
        )
    return {"routing": calls / max(block_s - multiplies_s, 1e-9)}


def _moe_block(work: Workload, tokens: int, compute: torch.dtype) -> Callable[[], None]:
    """The model's MoE block (router, routing, routed and shared experts) forward and backward on
    ``tokens`` tokens, as the trainer's mixed precision runs it."""
    block = moe_mlp(work.model)
    for parameter in block.parameters():  # made empty; any finite weights time alike
        torch.nn.init.normal_(parameter, std=0.02)
    x = torch.randn(tokens, work.model.n_embd, requires_grad=True)

    def run() -> None:
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
            out = block(x)
        out.float().backward(torch.ones(out.shape))

    return run


def _linears(
    shapes: list[tuple[int, int]], tokens: int, compute: torch.dtype
) -> Callable[[], None]:
    """Forward and backward of ``tokens`` rows through linear layers of (in, out) ``shapes`` as the
    trainer's mixed precision runs them: fp32 weights and inputs, the matmul under autocast."""
    pairs = [
        (torch.randn(tokens, k, requires_grad=True), torch.randn(n, k, requires_grad=True))
        for k, n in shapes
    ]

    def run() -> None:
        for x, w in pairs:
            with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
                y = F.linear(x, w)
            y.backward(torch.ones_like(y))

    return run
