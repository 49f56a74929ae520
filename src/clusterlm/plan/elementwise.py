"""The element-wise and indexing kernels the planner counts beside the FLOPs, priced at the
device's measured rates.

The FLOP-rated compute (``clusterlm.plan.efficiency``) carries a dense block's element-wise work
in its efficiency, all but its norms and rotary positions: one fused kernel per norm in gpt2,
several small ones per norm and rotation in llama, whose cost per FLOP differs by flavour. Where
measured (``bench.kernels.norm_rate``, tokens per second) they are priced per block and token.
Three parts of a step do element-wise work that a dense block of the same FLOPs does not, and
that grows with what they do rather than with the FLOPs: ring attention's merges of each block
into the running output (``context_comm.merge_kernels``), a mixture of experts' routing,
permutation and scatter (``moe_cost.routing_kernels``), and all-to-all attention's layout changes
around its exchanges. The first two are counted from the code in kernel calls and bytes touched,
and take ``calls / launch + bytes / elementwise`` seconds at the device's measured ``launch``
(kernel calls per second) and ``elementwise`` (bytes per second) rates
(``clusterlm.bench.kernels``); the routing's calls at the ``routing`` rate instead where it was
measured (``bench.kernels.routing_rate``: the MoE block timed whole, its bytes included). The
layout changes, strided copies and gathers by position that run far below the contiguous bytes
rate, are timed whole per layer (``bench.kernels.ulysses_rate``). A
device without them (an accelerator preset: its host launches ahead of the kernels, and these
kernels are small beside its matmuls) gets 0.

The optimizer step (``optimizer_seconds``) is element-wise work too, once a step over the state a
rank holds, priced at a rate measured on the model's own parameters; and so are FSDP's copies of
weights and gradients through its flat buffers (``fsdp_buffer_seconds``), which grow with the
bytes of the units it gathers and reduces, not with their tensors (the calibration's host cost
per tensor) or the link.
"""

from __future__ import annotations

from clusterlm.plan import context_comm, fsdp
from clusterlm.plan.cluster import Device
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import (
    fp32_weights_under_autocast,
    rank_for,
    state_bytes,
    state_bytes_per_param,
)
from clusterlm.plan.moe_cost import routing_kernels
from clusterlm.plan.workload import Workload


def kernel_seconds(work: Workload, device: Device, calls: float, nbytes: float) -> float:
    """Seconds of ``calls`` element-wise kernels touching ``nbytes`` on ``device``."""
    rates = device.kernel_rates.get(work.precision, {})
    if "launch" not in rates or "elementwise" not in rates:
        return 0.0
    return calls / rates["launch"] + nbytes / rates["elementwise"]


def micro_batch_seconds(
    work: Workload, layout: Layout, device: Device, layers: int, moe_blocks: int
) -> float:
    """One micro-batch's counted element-wise work on the busiest rank: ``layers`` blocks' norms
    and rotary positions, ring merges or all-to-all attention's layout changes (timed whole by
    ``bench.kernels.ulysses_rate``), and ``moe_blocks`` MoE blocks' routing."""
    tokens = context_comm.local_tokens(work, layout)
    residual = 4 if fp32_weights_under_autocast(work, layout) else work.activation_bytes
    rates = device.kernel_rates.get(work.precision, {})
    merge_calls, merge_bytes = context_comm.merge_kernels(work, layout)
    blocks = kernel_seconds(work, device, layers * merge_calls, layers * merge_bytes)
    blocks += layers * tokens / rates["norms"] if "norms" in rates else 0.0
    if "ulysses" in rates:  # full activation checkpointing runs the forward's again
        reruns = 1 if layout.activation_checkpointing == "full" else 0
        blocks += layers * (1 / rates["ulysses"] + reruns / rates["ulysses_forward"])
    if not moe_blocks:
        return blocks
    route_calls, route_bytes = routing_kernels(work, layout, tokens, residual)
    if "routing" not in rates:
        return blocks + kernel_seconds(
            work, device, moe_blocks * route_calls, moe_blocks * route_bytes
        )
    return blocks + moe_blocks * route_calls / rates["routing"]


def optimizer_seconds(work: Workload, layout: Layout, device: Device) -> float:
    """The optimizer step on the busiest rank: gradient clipping and AdamW over the parameters
    whose state it holds (its ZeRO share), at the device's measured ``optimizer`` rate in
    parameters per second (``bench.parameter_rates.optimizer_rate``); 0 where none was measured
    or the state lives on the host (``timing``'s offload prices that)."""
    rate = device.kernel_rates.get(work.precision, {}).get("optimizer")
    if rate is None or layout.cpu_offload:
        return 0.0
    per_param = state_bytes_per_param(0, 1, work.mixed_precision)[2]
    stepped = max(
        state_bytes(work, layout, layout.zero_stage, rank_for(layout, stage))[2]
        for stage in ("first", "last")
    )
    return stepped / per_param / rate


def fsdp_buffer_seconds(work: Workload, layout: Layout, device: Device) -> float:
    """FSDP's copies through its flat buffers per step (``fsdp.buffer_bytes``) at the device's
    measured ``fsdp_buffers`` rate in bytes per second
    (``bench.parameter_rates.fsdp_buffer_rate``); 0 where none was measured."""
    rate = device.kernel_rates.get(work.precision, {}).get("fsdp_buffers")
    if rate is None:
        return 0.0
    return fsdp.buffer_bytes(work, layout, fsdp.parameter_tensors(work.model)) / rate
