"""Which device to run on and what its peak FLOP/s is, for MFU; on a CPU, which attention kernel
runs a shape faster.

GPU peaks are the vendors' dense (not 2:4-sparse) 16-bit tensor-core figures. A CPU has no
datasheet figure we can trust, so its peak is measured once by a short matmul probe and cached;
the faster of its flash and math attention kernels at a shape is probed and cached alike.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clusterlm.errors import UserError
from clusterlm.files import atomic_write

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
        raise UserError(f"training.device {name!r} is not a device; use cpu, cuda or auto") from None


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
    return torch.backends.cpu.get_cpu_capability().lower(), os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower()


def cpu_identity() -> str:
    """What a CPU probe's figure depends on: the model and the instruction sets its kernels may use,
    so a home directory shared by nodes of different CPUs, or a run restricted to AVX2, never reads
    another's bf16 rate."""
    aten, onednn = kernel_instruction_sets()
    return f"{cpu_model_name()}|{aten}" + (f"|onednn={onednn}" if onednn else "")


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "clusterlm" / "cpu_peak.json"


def measure_cpu_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square matmul over a short run, with the current thread count."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: first call picks kernels
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpu_peak_flops(dtype: torch.dtype, remeasure: bool = False) -> float:
    """The CPU peak for this processor, thread count and dtype: the best probe seen, cached on
    disk. A probe on a busy machine reads low, so ``remeasure`` (used by benchmarks) probes again
    and keeps the higher figure."""
    key = f"{cpu_identity()}|threads={torch.get_num_threads()}|{dtype}"
    path, cache = _cache_file(), _read_cache()
    if key not in cache or remeasure:
        cache[key] = max(cache.get(key, 0.0), measure_cpu_peak(dtype))
        atomic_write(path, json.dumps(cache, indent=1))
    return float(cache[key])


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


# Above this many bytes of one layer's s x s scores the math kernel is not tried: it keeps them for
# backward in every layer, and flash wins there anyway (4.5x at 4 x 12 heads x 1024 x 64 in bf16).
MATH_ATTENTION_MAX_BYTES = 64 * 2**20


def cpu_attention_kernel(shape: tuple[int, int, int, int], dtype: torch.dtype) -> str:
    """``flash`` or ``math``: the faster of torch's two CPU kernels, forward and backward, for causal
    attention of ``shape`` (batch, heads, sequence, head size) in ``dtype`` at this thread count.
    Probed once and cached on disk, so every run here at this shape makes the same choice. In bf16
    on an Intel Xeon with AMX, flash took 5.5 ms against 1.9 ms for math at 12 x 4 x 64 x 32, and
    34.2 against 42.0 ms at 8 x 12 x 256 x 64."""
    batch, heads, seq, _ = shape
    if batch * heads * seq * seq * dtype.itemsize > MATH_ATTENTION_MAX_BYTES:
        return "flash"
    key = f"{cpu_identity()}|threads={torch.get_num_threads()}|attention {'x'.join(map(str, shape))}|{dtype}"
    cache = _read_cache()
    if key not in cache:
        cache[key] = min(("flash", "math"), key=lambda kernel: _attention_seconds(shape, dtype, kernel))
        atomic_write(_cache_file(), json.dumps(cache, indent=1))
    return str(cache[key])


def _attention_seconds(shape: tuple[int, int, int, int], dtype: torch.dtype, kernel: str, rounds: int = 3) -> float:
    """Best seconds of a causal attention's forward and backward with ``kernel``."""
    qkv = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
    backend = SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.MATH
    best = float("inf")
    for index in range(rounds + 1):  # the first call picks kernels and allocates: not timed
        start = time.perf_counter()
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
        out.backward(torch.ones_like(out))
        best = best if index == 0 else min(best, time.perf_counter() - start)
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float | None:
    """Peak FLOP/s to compute MFU against: the configured figure, the GPU table, or the CPU probe."""
    if configured:
        return configured
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops(dtype, remeasure=True)  # half a second, and the cache keeps the best


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
