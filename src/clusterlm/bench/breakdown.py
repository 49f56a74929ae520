"""Where a training step's time goes, by kind of work (``bench train --breakdown``).

- On a CPU the operators' self times from the profiler, summed by kind (``WORK_KINDS``); the rest
  of the wall time, "outside ops", is spent outside operators (Python, autograd, the compiler's
  guards).
- On a GPU the device's own timeline: each kernel's duration summed by kind (``KERNEL_KINDS``,
  host-to-device copies as "data"), and "idle gaps", the wall time in which no kernel ran: the
  device waiting for the host (launch overhead, synchronizations, the loader).

Profiling adds overhead to every operator, so the profiled step may read slower than the timed one.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from clusterlm.bench.timer import time_steps
from clusterlm.train.session import Session

# Operators by kind of work, matched on the profiler's names. Each operator's self time counts
# once, so a compiled graph's fused kernels land on the graph's call and its matmuls on aten::mm.
WORK_KINDS = {
    "matmul": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_addmm_activation",
        "aten::_grouped_mm",  # a mixture of experts' experts
    ),
    "attention": ("scaled_dot_product",),
    "compiled kernels": ("## Call CompiledFxGraph", "graph_"),
    "optimizer": ("Optimizer.", "adam", "_foreach_", "linalg_vector_norm"),
}
# CUDA kernels by kind, matched (case-insensitively) on their names: cuBLAS/CUTLASS matmuls, flash
# and memory-efficient attention, the fused and foreach optimizer kernels, NCCL's collectives,
# host-to-device copies. Triton kernels that torch.compile generates are "other kernels".
KERNEL_KINDS = {
    "matmul": ("gemm", "xmma", "cutlass", "nvjet", "cublas"),
    "attention": ("flash", "fmha", "attention"),
    "optimizer": ("adam", "multi_tensor_apply", "foreach"),
    "communication": ("nccl",),
    "data": ("memcpy htod",),
}


def _kind(name: str, kinds: dict[str, tuple[str, ...]], default: str) -> str:
    lowered = name.lower()
    for kind, patterns in kinds.items():
        if any(pattern.lower() in lowered for pattern in patterns):
            return kind
    return default


def work_kind(op_name: str) -> str:
    return _kind(op_name, WORK_KINDS, "other ops")


def kernel_kind(kernel_name: str) -> str:
    return _kind(kernel_name, KERNEL_KINDS, "other kernels")


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time in which at least one kernel ran,
    kernels on concurrent streams counted once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def kernel_breakdown(
    kernels: list[tuple[float, float, str]], wall: float, steps: int
) -> dict[str, float]:
    """Seconds per step by kind of kernel from ``(start_s, end_s, name)`` device events over
    ``steps`` steps of ``wall`` seconds each, and the idle gaps: wall time with no kernel
    running."""
    spent = dict.fromkeys([*KERNEL_KINDS, "other kernels"], 0.0)
    for start, end, name in kernels:
        spent[kernel_kind(name)] += (end - start) / steps
    spent["idle gaps"] = max(
        0.0, wall - busy_seconds((start, end) for start, end, _ in kernels) / steps
    )
    return spent


def step_breakdown(session: Session, steps: int) -> tuple[float, dict[str, float]]:
    """(seconds per step, seconds per step by kind of work) of ``steps`` profiled steps."""
    on_gpu = session.runtime.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        wall = sum(time_steps(session, steps)) / steps
    if on_gpu:
        kernels = [
            (e.time_range.start / 1e6, e.time_range.end / 1e6, e.name)
            for e in profiler.events()
            if e.device_type == DeviceType.CUDA
        ]
        return wall, kernel_breakdown(kernels, wall, steps)
    spent = dict.fromkeys([*WORK_KINDS, "other ops"], 0.0)
    for event in profiler.key_averages():
        spent[work_kind(event.key)] += event.self_cpu_time_total / 1e6 / steps
    spent["outside ops"] = max(0.0, wall - sum(spent.values()))
    return wall, spent
