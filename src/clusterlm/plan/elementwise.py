"""The element-wise and indexing kernels the planner counts beside the FLOPs, priced at the
device's measured rates.

The FLOP-rated compute (``clusterlm.plan.efficiency``) carries a dense block's element-wise work
in its efficiency. Two parts of a step do element-wise work that a dense block of the same FLOPs
does not, and that grows with what they do rather than with the FLOPs: ring attention's merges
of each block into the running output (``context_comm.merge_kernels``) and a mixture of experts'
routing, permutation and scatter (``moe_cost.routing_kernels``). Each is counted from the code in
kernel calls and bytes touched, and takes ``calls / launch + bytes / elementwise`` seconds at the
device's measured ``launch`` (kernel calls per second) and ``elementwise`` (bytes per second)
rates (``clusterlm.bench.kernels``). A device without them (an accelerator preset: its host
launches ahead of the kernels, and these kernels are small beside its matmuls) gets 0.
"""

from __future__ import annotations

from clusterlm.plan import context_comm
from clusterlm.plan.cluster import Device
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import fp32_weights_under_autocast
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
    """One micro-batch's counted element-wise work on the busiest rank: ``layers`` blocks' ring
    merges and ``moe_blocks`` MoE blocks' routing."""
    tokens = context_comm.local_tokens(work, layout)
    residual = 4 if fp32_weights_under_autocast(work, layout) else work.activation_bytes
    merge_calls, merge_bytes = context_comm.merge_kernels(work, layout)
    route_calls, route_bytes = (
        routing_kernels(work, layout, tokens, residual) if moe_blocks else (0.0, 0.0)
    )
    return kernel_seconds(
        work,
        device,
        layers * merge_calls + moe_blocks * route_calls,
        layers * merge_bytes + moe_blocks * route_bytes,
    )
