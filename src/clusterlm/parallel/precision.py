"""Mixed precision: compute in bf16/fp16 under autocast, keep fp32 master weights and optimizer
state; fp16 (CUDA only) scales the loss so small gradients survive the narrow exponent.

``auto`` (the default) is resolved once per run by ``settle_precision``: bf16 where the device
computes it natively, a GPU with bf16 support or a CPU whose measured bf16 matmul rate beats its
fp32 rate (AVX512-BF16 or AMX; ``clusterlm.hardware`` probes and caches both), fp32 elsewhere. A
CPU without those instructions emulates bf16 at a small fraction of its fp32 speed. Under 16-bit
compute on a CPU, ``settle_attention`` resolves ``training.attention = auto`` to the faster kernel.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from clusterlm.distributed.json_collectives import broadcast_json
from clusterlm.errors import UserError
from clusterlm.hardware import cpu_attention_kernel, cpu_peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> tuple[str, str | None]:
    """(the precision to train in for ``name`` on ``device``, a warning line or None)."""
    if device.type == "cuda":
        return (
            "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        ) if name == "auto" else name, None
    if device.type != "cpu" or name not in ("auto", "bf16"):
        return ("fp32" if name == "auto" else name), None
    fp32, bf16 = cpu_peak_flops(torch.float32), cpu_peak_flops(torch.bfloat16)
    if bf16 > fp32:
        return "bf16", None
    if name == "auto":
        return "fp32", None
    return "bf16", (
        f"warning: training.precision = bf16 on a CPU that emulates it: bf16 matmul "
        f"{bf16 / 1e9:.1f} GFLOP/s against fp32 {fp32 / 1e9:.1f} GFLOP/s; "
        "fp32 (or auto) trains faster here"
    )


def settle_precision(name: str, device: torch.device, announce: bool = True) -> str:
    """``resolve_precision``, agreed on by every rank, with its warning printed once."""
    precision, warning = resolve_precision(name, device)
    if name == "auto":
        precision = _agreed(lambda: precision)
    if warning and announce:
        print(warning, file=sys.stderr, flush=True)
    return precision


def settle_attention(
    name: str,
    precision: str,
    device: torch.device,
    shape: tuple[int, int, int, int],
    dropout: float = 0.0,
) -> str:
    """``training.attention = auto`` on a CPU computing in 16 bits: the faster of the flash and math
    kernels for causal attention of ``shape`` (``cpu_attention_kernel``), agreed on by every rank;
    otherwise ``name``. In fp32 flash was the faster at every shape measured
    (benchmarks/attention-kernels-cpu-xeon-amx-2026-12-01.md), and a GPU's ``auto`` is torch's
    choice. torch's CPU flash kernel has no dropout, so attention dropout on a CPU takes math."""
    if device.type == "cpu" and dropout and name == "flash":
        raise UserError(
            "training.attention = flash has no attention dropout on a CPU; "
            "set training.attention = auto or math, or model.dropout = 0"
        )
    if name != "auto" or device.type != "cpu" or precision == "fp32":
        return name
    if dropout:
        return "math"
    return _agreed(lambda: cpu_attention_kernel(shape, DTYPES[precision]))


def _agreed(choose: Callable[[], str]) -> str:
    """What ``choose`` returns on rank 0, on every rank: probes on a busy machine can disagree, and
    ranks must compute alike. Only rank 0 chooses, so a first run's probe is not repeated by every
    rank at once on shared cores."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return choose()
    chosen = broadcast_json(choose() if dist.get_rank() == 0 else None)
    assert isinstance(chosen, str)  # rank 0's choice, on every rank
    return chosen


class Precision:
    def __init__(self, name: str, device: torch.device, sharded: bool = False):
        if name == "fp16" and device.type != "cuda":
            raise UserError("training.precision = fp16 needs a CUDA device; use bf16 on CPU")
        self.name, self.device = name, device
        self.compute_dtype = DTYPES[name]
        self.scaler = None
        if name == "fp16":
            # Sharded gradients need the overflow check agreed across ranks.
            self.scaler = (
                ShardedGradScaler(device.type) if sharded else torch.amp.GradScaler(device.type)
            )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Optimizer steps; with a scaler, skipped when gradients overflowed, and the scale
        adapts."""
        for optimizer in optimizers:
            if self.scaler:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler:
            self.scaler.update()

    def skip(self) -> None:
        """A step not taken (``training.skip_nonfinite``): the loss scaler still closes its
        iteration, lowering the scale when the gradients overflowed."""
        if self.scaler:
            self.scaler.update()
