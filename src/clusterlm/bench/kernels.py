"""The rates one CPU thread reaches on a training step's two kinds of multiply, at the step's own
shapes and precision: the linear layers (QKV, output projection, MLP, head) and the attention core,
each forward and backward.

``plan --validate`` describes its local devices by them, because a CPU's large-matrix peak says
little about a small model's step, and the two kinds part ways by precision: bf16 may speed the
linear layers up and slow short-sequence attention down
(benchmarks/kernel-rates-cpu-epyc-zen4-2026-12-01.md). Rates count the planner's FLOPs
(``clusterlm.plan.efficiency``: the attention core over the full s x s), so they divide its FLOP
counts back into seconds; ``relative_kernel_rates`` anchors them to the matmul probe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clusterlm.parallel.precision import DTYPES
from clusterlm.plan.workload import Workload


def kernel_rates(work: Workload, micro_batch: int) -> dict[str, float]:
    """{"linear": FLOP/s, "attention": FLOP/s} of one thread on ``micro_batch`` sequences: the
    linear rate is the model's mix, n_layer blocks' linear layers and the head once."""
    args, s = work.model, work.seq_len
    tokens = micro_batch * s
    compute = DTYPES[work.precision]
    q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    mlp_in = (2 if args.is_llama else 1) * args.ffn_hidden
    block = [
        (args.n_embd, q + 2 * kv),
        (q, args.n_embd),
        (args.n_embd, mlp_in),
        (args.ffn_hidden, args.n_embd),
    ]
    head = [(args.n_embd, args.vocab_size)]
    # Attention sees the QKV projection's output, already in the compute dtype.
    query, key, value = (
        torch.randn(micro_batch, args.n_head, s, args.head_dim, dtype=compute, requires_grad=True)
        for _ in range(3)
    )

    def attention() -> None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        out.backward(torch.ones_like(out))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block_s, head_s = (
            _seconds(_linears(block, tokens, compute)),
            _seconds(_linears(head, tokens, compute)),
        )
        attention_s = _seconds(attention)
    finally:
        torch.set_num_threads(threads)
    linear_flops = (
        6 * tokens * (args.n_layer * sum(k * n for k, n in block) + sum(k * n for k, n in head))
    )
    attention_flops = (
        6 * tokens * 2 * q * s
    )  # one layer's, as the planner counts it: the full s x s
    return {
        "linear": linear_flops / (args.n_layer * block_s + head_s),
        "attention": attention_flops / attention_s,
    }


def relative_kernel_rates(work: Workload, micro_batch: int, fp32_peak: float) -> dict[str, float]:
    """``kernel_rates`` scaled so that fp32's linear layers run at ``fp32_peak`` (the matmul
    probe's): an isolated probe reads lower than the same kernels inside a training step (warm
    caches, reused allocations), so only its ratios are used, by kind and precision."""
    rates = kernel_rates(work, micro_batch)
    fp32 = (
        rates
        if work.precision == "fp32"
        else kernel_rates(dataclasses.replace(work, precision="fp32"), micro_batch)
    )
    return {kind: rate / fp32["linear"] * fp32_peak for kind, rate in rates.items()}


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


def _seconds(fn: Callable[[], None], calls: int = 5, rounds: int = 3) -> float:
    """Seconds per call, the best of ``rounds`` (other load only adds time)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best
