"""Mixed precision: compute in bf16/fp16 under autocast, keep fp32 master weights and optimizer
state; fp16 (CUDA only) scales the loss so small gradients survive the narrow exponent."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from clusterlm.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device, sharded: bool = False):
        if name == "fp16" and device.type != "cuda":
            raise UserError("training.precision = fp16 needs a CUDA device; use bf16 on CPU")
        self.name, self.device = name, device
        self.compute_dtype = DTYPES[name]
        self.scaler = None
        if name == "fp16":
            # Sharded gradients need the overflow check agreed across ranks.
            self.scaler = ShardedGradScaler(device.type) if sharded else torch.amp.GradScaler(device.type)

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
        """Optimizer steps; with a scaler, skipped when gradients overflowed, and the scale adapts."""
        for optimizer in optimizers:
            if self.scaler:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler:
            self.scaler.update()
