"""Rates measured on this machine, once, and cached on disk: a CPU's peak matmul FLOP/s (a CPU has
no datasheet figure we can trust), and which of torch's CPU attention kernels runs a shape faster.
The peak FLOP/s to compute MFU against, whatever the device, is answered here too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clusterlm.files import atomic_write
from clusterlm.hardware.devices import cpu_identity, gpu_peak_flops


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
# backward in every layer, and flash wins there anyway
# (benchmarks/attention-kernels-cpu-xeon-amx-2026-12-01.md).
MATH_ATTENTION_MAX_BYTES = 64 * 2**20


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float | None:
    """Peak FLOP/s to compute MFU against: the configured figure, the GPU table, or the CPU
    probe."""
    if configured:
        return configured
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops(dtype, remeasure=True)  # half a second, and the cache keeps the best


def cpu_attention_kernel(shape: tuple[int, int, int, int], dtype: torch.dtype) -> str:
    """``flash`` or ``math``: the faster of torch's two CPU kernels, forward and backward, for
    causal attention of ``shape`` (batch, heads, sequence, head size) in ``dtype`` at this thread
    count. Probed once and cached on disk, so every run here at this shape makes the same choice.
    In bf16 math wins at short sequences and flash at long ones
    (benchmarks/attention-kernels-cpu-xeon-amx-2026-12-01.md)."""
    batch, heads, seq, _ = shape
    if batch * heads * seq * seq * dtype.itemsize > MATH_ATTENTION_MAX_BYTES:
        return "flash"
    dims = "x".join(map(str, shape))
    key = f"{cpu_identity()}|threads={torch.get_num_threads()}|attention {dims}|{dtype}"
    cache = _read_cache()
    if key not in cache:
        cache[key] = min(
            ("flash", "math"), key=lambda kernel: _attention_seconds(shape, dtype, kernel)
        )
        atomic_write(_cache_file(), json.dumps(cache, indent=1))
    return str(cache[key])


def _attention_seconds(
    shape: tuple[int, int, int, int], dtype: torch.dtype, kernel: str, rounds: int = 3
) -> float:
    """Best seconds of a causal attention's forward and backward with ``kernel``."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    backend = SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.MATH
    best = float("inf")
    for index in range(rounds + 1):  # the first call picks kernels and allocates: not timed
        start = time.perf_counter()
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))
        best = best if index == 0 else min(best, time.perf_counter() - start)
    return best
