"""How much of the device's peak a training step's compute reaches, by the model's shapes.

A Transformer block is its matrix multiplies plus the work between them (norms, residual adds,
activation functions, the softmax, dropout, kernel launches). Per token, the multiplies grow with
the model width d squared and the rest with d, so the block's achieved rate rises with d. The
planner models it as

    efficiency(w) = compute_efficiency * w / (w + efficiency_half_width)

with ``w`` = d for every multiply of a block, and for the output head the smaller side of its
output (tokens of the micro-batch, or the vocabulary on one tensor-parallel rank); the step's rate
is the FLOP-weighted harmonic mean over the block's multiplies (QKV and output projections, the
MLP's, the attention core) and the head. Why d and not each multiply's own output width on one
tensor-parallel rank: Megatron-LM's pipeline-free runs (Narayanan et al. 2021, Table 1: 1.7B to
18B, tp 1 to 8) fit closely by d, and worse by the per-rank width
(benchmarks/planner-published-runs-2026-12-01.md), which would
make a tp = 8 block slower than the same block on one GPU (their 18B at tp 8 runs as fast per GPU
as their 1.7B at tp 1). Tokens per micro-batch do not enter a block's efficiency: every run
behind the tables has at least 1024. ``compute_efficiency`` (the ceiling) and
``efficiency_half_width`` (the width at which half of it is reached) form the per-device-kind
table in each cluster preset's ``[calibration]``, with where they came from (``fit_efficiency``
refits them). A half-width of 0 is one constant, as on a CPU, where ``plan --validate`` fits the
constant on this machine.
"""

from __future__ import annotations

from clusterlm.models.counting import training_flops_per_token
from clusterlm.plan.calibration import Calibration
from clusterlm.plan.cluster import Device
from clusterlm.plan.layout import Layout
from clusterlm.plan.moe_cost import moe_mlp_params
from clusterlm.plan.workload import Workload


def head_flops_per_token(work: Workload) -> float:
    """Forward + backward FLOPs of the output projection per token (part of the 6N)."""
    return 6.0 * work.model.vocab_size * work.model.n_embd


def layer_flops_per_token(work: Workload) -> float:
    """One block's share of ``training_flops_per_token``: the rest after the head, per layer."""
    args = work.model
    return (
        training_flops_per_token(args, work.seq_len) - head_flops_per_token(work)
    ) / args.n_layer


def matmul_shapes(work: Workload, layout: Layout) -> list[tuple[float, float]]:
    """(FLOPs per token, width ``w``) of the blocks' multiplies and of the head's, on one tp
    rank."""
    args, t = work.model, layout.tp
    d, f, s = args.n_embd, args.ffn_hidden, work.seq_len
    q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    mlp_in = (2 if args.is_llama else 1) * f
    moe = len(args.moe_blocks(args.n_layer))
    # Forward multiply-adds per token: QKV, output projection, MLP in and out (an MoE block's
    # router and active experts), and the attention scores with their weighted sum over the full
    # s x s.
    mlp = (args.n_layer - moe) * (d * mlp_in + f * d) + moe * moe_mlp_params(args, active=True)
    block = (d * (q + 2 * kv) + q * d + 2 * q * s) * args.n_layer + mlp
    tokens = s // layout.cp * layout.micro_batch_size
    return [
        (6.0 * block / t, d),
        (head_flops_per_token(work) / t, min(tokens, args.vocab_size / t)),
    ]


def shape_efficiency(work: Workload, layout: Layout, calibration: Calibration) -> float:
    """Achieved / peak FLOP/s of the step's multiplies (the FLOP-weighted harmonic mean)."""
    ceiling, half = calibration.compute_efficiency, calibration.efficiency_half_width
    if half == 0:
        return ceiling
    shapes = matmul_shapes(work, layout)
    seconds_per_peak_flop = sum(
        flops * (width + half) / (ceiling * width) for flops, width in shapes
    )
    return sum(flops for flops, _ in shapes) / seconds_per_peak_flop


def kernel_flops_per_token(work: Workload, layout: Layout) -> tuple[float, float]:
    """(linear layers', attention core's) training FLOPs per token on one tensor-parallel rank."""
    args = work.model
    attention = 6.0 * 2 * args.n_head * args.head_dim * work.seq_len * args.n_layer / layout.tp
    return sum(flops for flops, _ in matmul_shapes(work, layout)) - attention, attention


def compute_rate(work: Workload, layout: Layout, device: Device, calibration: Calibration) -> float:
    """Achieved FLOP/s of the step's compute. A device with measured kernel rates for the precision
    (a CPU that ``plan --validate`` probed, ``clusterlm.bench.kernels``) runs each kind of multiply
    at its own rate, and ``compute_efficiency`` is the share the rest of the step (element-wise
    work, launches) leaves; any other runs at its peak times the shape efficiency."""
    rates = device.kernel_rates.get(work.precision)
    if not rates:
        return device.peak_flops[work.precision] * shape_efficiency(work, layout, calibration)
    linear, attention = kernel_flops_per_token(work, layout)
    seconds = linear / rates["linear"] + attention / rates["attention"]
    return (linear + attention) / seconds * calibration.compute_efficiency
