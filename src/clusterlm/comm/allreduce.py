"""One entry point for every all-reduce algorithm: ``all_reduce(tensor, op, algorithm, group)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from clusterlm.comm.halving_doubling import halving_doubling
from clusterlm.comm.parameter_server import parameter_server
from clusterlm.comm.peers import Peers
from clusterlm.comm.ring import ring
from clusterlm.comm.tree import tree
from clusterlm.comm.two_level import hierarchical, mesh2d


def native(buf: torch.Tensor, peers: Peers) -> None:
    """The library's own all-reduce (gloo or NCCL): the reference the others are tested against."""
    dist.all_reduce(buf, group=peers.group)


# name -> fn(flat contiguous buffer, peers, **options) summing the buffer in place
ALGORITHMS: dict[str, Callable[..., None]] = {
    "native": native,
    "ring": ring,
    "tree": tree,
    "halving_doubling": halving_doubling,
    "hierarchical": hierarchical,
    "mesh2d": mesh2d,
    "parameter_server": parameter_server,
}
OPS = ("sum", "avg")


def all_reduce(
    tensor: torch.Tensor,
    op: str = "sum",
    algorithm: str = "native",
    group: dist.ProcessGroup | None = None,
    **options: Any,
) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` (default: world) in place with ``algorithm``; returns it.

    ``op`` is "sum" or "avg" (average: floating-point tensors only). ``options`` go to the
    algorithm, e.g. ``chunk_bytes`` for the ring or ``num_servers`` for the parameter server.
    Every rank of the group must call it with the same shape, dtype, op, algorithm and options.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown all-reduce algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}"
        )
    if op not in OPS:
        raise ValueError(f"unknown reduce op {op!r}; choose one of: {', '.join(OPS)}")
    if op == "avg" and not tensor.is_floating_point():
        raise TypeError(f"op='avg' needs a floating-point tensor, got {tensor.dtype}; use op='sum'")
    peers = Peers.of_group(group)
    if tensor.numel() == 0:  # every rank sees the same size, so all of them skip together
        return tensor
    in_place = tensor.is_contiguous()
    flat = tensor.view(-1) if in_place else tensor.reshape(-1).clone()
    ALGORITHMS[algorithm](flat, peers, **options)
    if not in_place:
        tensor.copy_(flat.view_as(tensor))
    if op == "avg":
        tensor.div_(peers.size)
    return tensor
