"""The machine: which device to run on and what it is (``devices``), and the rates measured on it
once and cached, its peak FLOP/s and its faster attention kernel (``rates``)."""

from clusterlm.hardware.devices import (
    GPU_PEAK_FLOPS,
    cpu_identity,
    cpu_model_name,
    device_kind,
    gpu_peak_flops,
    kernel_instruction_sets,
    peak_memory_bytes,
    resolve_device,
)
from clusterlm.hardware.rates import (
    cpu_attention_kernel,
    cpu_peak_flops,
    measure_cpu_peak,
    peak_flops,
)

__all__ = [
    "GPU_PEAK_FLOPS",
    "cpu_attention_kernel",
    "cpu_identity",
    "cpu_model_name",
    "cpu_peak_flops",
    "device_kind",
    "gpu_peak_flops",
    "kernel_instruction_sets",
    "measure_cpu_peak",
    "peak_flops",
    "peak_memory_bytes",
    "resolve_device",
]
