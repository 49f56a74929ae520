"""How much of the device's peak a training step's matrix multiplies reach, by their shapes.

A GEMM of M x K by K x N runs near the device's best rate only when its output tile grid is large:
narrow matrices leave tensor cores or vector units waiting on memory and on tile edges. The
planner models each multiply's efficiency as

    efficiency(w) = compute_efficiency * w / (w + efficiency_half_width)

with ``w`` the smaller side of its output (tokens of the micro-batch, or the output width on one
tensor-parallel rank), and the step's compute rate as the FLOP-weighted harmonic mean over the
block's multiplies (QKV and output projections, the MLP's, the attention core of s x s scores) and
the output head. ``compute_efficiency`` (the large-GEMM ceiling) and ``efficiency_half_width`` (the
width at which half of it is reached) form the per-device-kind table: they live in each cluster
preset's ``[calibration]`` with where they came from. A half-width of 0 is one constant, as on a
CPU, where ``plan --validate`` fits the constant on this machine.
"""

from __future__ import annotations

from clusterlm.models.counting import training_flops_per_token
from clusterlm.plan.calibration import Calibration
from clusterlm.plan.layout import Layout
from clusterlm.plan.workload import Workload


def head_flops_per_token(work: Workload) -> float:
    """Forward + backward FLOPs of the output projection per token (part of the 6N)."""
    return 6.0 * work.model.vocab_size * work.model.n_embd


def layer_flops_per_token(work: Workload) -> float:
    """One block's share of ``training_flops_per_token``: the rest after the head, per layer."""
    args = work.model
    return (training_flops_per_token(args, work.seq_len) - head_flops_per_token(work)) / args.n_layer


def matmul_shapes(work: Workload, layout: Layout) -> list[tuple[float, float]]:
    """(FLOPs per token, smaller output side) of each multiply one tensor-parallel rank runs."""
    args, t = work.model, layout.tp
    d, f, s = args.n_embd, args.ffn_hidden, work.seq_len
    q, kv = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    tokens = s * layout.micro_batch_size
    mlp_in = (2 if args.is_llama else 1) * f
    shapes = [  # (forward multiply-adds per token, output width), all on one tp rank
        (d * (q + 2 * kv) / t, (q + 2 * kv) / t),
        (q * d / t, d),
        (d * mlp_in / t, mlp_in / t),
        (f * d / t, d),
        (2 * q * s / t, s),  # attention scores and their weighted sum, over the full s x s
    ]
    per_layer = [(6.0 * macs * args.n_layer, min(tokens, width)) for macs, width in shapes]
    return [*per_layer, (head_flops_per_token(work) / t, min(tokens, args.vocab_size / t))]


def shape_efficiency(work: Workload, layout: Layout, calibration: Calibration) -> float:
    """Achieved / peak FLOP/s of the step's multiplies (the FLOP-weighted harmonic mean)."""
    ceiling, half = calibration.compute_efficiency, calibration.efficiency_half_width
    if half == 0:
        return ceiling
    shapes = matmul_shapes(work, layout)
    seconds_per_peak_flop = sum(flops * (width + half) / (ceiling * width) for flops, width in shapes)
    return sum(flops for flops, _ in shapes) / seconds_per_peak_flop
