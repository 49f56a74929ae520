"""A checkpoint never holds non-finite values: a save checks its tensors before writing.

A checkpoint of NaN or infinite weights would become the newest complete one, and ``--resume
auto`` would continue from it. ``check_finite`` looks at every floating-point tensor of this
rank's share of the state (model and optimizer); the ranks agree on the answer, so all of them
refuse the save together, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from clusterlm.errors import UserError


def _tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, Mapping):
        for key, value in state.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, torch.Tensor):
        local = state.to_local() if isinstance(state, DTensor) else state
        if local.is_floating_point() and local.numel():
            yield prefix, local


def first_nonfinite(state: Mapping[str, Any]) -> str | None:
    """The name of the first tensor of ``state`` holding a NaN or an infinity, or None."""
    named = list(_tensors(state))
    if not named:
        return None
    flags = torch.stack([torch.isfinite(tensor).all().cpu() for _, tensor in named])
    bad = (~flags).nonzero()
    return named[int(bad[0])][0] if bad.numel() else None


def check_finite(state: Mapping[str, Any], step: int) -> None:
    """Raise UserError on every rank when any rank's share of ``state`` is not finite."""
    name = first_nonfinite(state)
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([0.0 if name is None else 1.0])
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count)
        if count.item() and name is None:
            name = "a tensor of another rank"
    if name is not None:
        raise UserError(
            f"step {step}: {name} holds NaN or infinite values; the checkpoint was not saved, "
            "so the newest complete one is from before; lower optim.lr or set "
            "training.skip_nonfinite = true"
        )
