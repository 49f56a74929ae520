"""The parameter server's wire protocol: what a worker and a server send each other.

Each worker talks to each server over its own two-rank gloo group (``pair_group``). Every message
opens with a header of ``HEADER`` float64 values (``message``): a worker's is (kind, learning rate,
gradient values), where the kind is ``JOIN``, ``PUSH`` or ``SNAPSHOT``. Tensors travel as one flat
fp32 CPU tensor (``flatten``, ``unflatten_into``), since gloo sends host memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import cast

import torch
import torch.distributed as dist

from clusterlm.distributed.signing import SignedStore

HEADER = 8  # float64 values that open every message
JOIN, PUSH, SNAPSHOT = 0.0, 1.0, 2.0


def message(*values: float) -> torch.Tensor:
    """A header: ``values`` then zeros. A worker's is (kind, learning rate, gradient values)."""
    header = torch.zeros(HEADER, dtype=torch.float64)
    header[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return header


def pair_group(store: SignedStore, key: str, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """A two-rank gloo group (server rank 0, worker rank 1) of its own, outside the job's group."""
    group = dist.ProcessGroupGloo(
        dist.PrefixStore(key, store), rank, 2, timedelta(seconds=timeout_s)
    )
    # A gloo Backend, used for its send and recv, which ProcessGroup's stubs declare and Backend's
    # omit.
    return cast(dist.ProcessGroup, group)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 CPU tensor (the pair groups are gloo's, which sends host memory)."""
    return (
        torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        if tensors
        else torch.zeros(0)
    )


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
