"""Which device to run on, what it is called, and its peak memory use.

GPU peaks are the vendors' dense (not 2:4-sparse) 16-bit tensor-core figures, for MFU; a CPU's
peak is measured (``clusterlm.hardware.rates``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from clusterlm.errors import UserError

# Dense bf16 (fp16 where the chip has no bf16) tensor-core peak FLOP/s, from vendor datasheets.
GPU_PEAK_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # unnamed H100 variants: assume SXM
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"training.device = {name} but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(
            f"training.device {name!r} is not a device; use cpu, cuda or auto"
        ) from None


def gpu_peak_flops(device_name: str) -> float | None:
    """Longest table key contained in the device name ('NVIDIA H100 80GB HBM3' -> 'H100')."""
    matches = [key for key in GPU_PEAK_FLOPS if key.lower() in device_name.lower()]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_kind(name: str) -> str:
    """What kind of device a name denotes, for telling measurements of one kind from another: the
    GPU table's model ('H100' for 'H100-SXM5-80GB', 'H200' for 'NVIDIA H200'), else the name in
    lower case without a parenthesized remark (a CPU's thread count)."""
    matches = [key for key in GPU_PEAK_FLOPS if key.lower() in name.lower()]
    if matches:
        return max(matches, key=len).split()[0]
    return name.split("(")[0].strip().lower()


def kernel_instruction_sets() -> tuple[str, str]:
    """(the instruction set torch's CPU kernels use, oneDNN's ceiling or ""): narrower than the
    CPU's flags where ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` restrict them."""
    return torch.backends.cpu.get_cpu_capability().lower(), os.environ.get(
        "ONEDNN_MAX_CPU_ISA", ""
    ).lower()


def cpu_identity() -> str:
    """What a CPU probe's figure depends on: the model and the instruction sets its kernels may use,
    so a home directory shared by nodes of different CPUs, or a run restricted to AVX2, never reads
    another's bf16 rate."""
    aten, onednn = kernel_instruction_sets()
    return f"{cpu_model_name()}|{aten}" + (f"|onednn={onednn}" if onednn else "")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
