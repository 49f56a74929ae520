"""The one device mesh that names every parallel dimension: ``pp x dp_replicate x dp_shard x tp``.
Its degrees are worked out and checked from the config alone (``clusterlm.config.degrees``)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(device: torch.device, pp: int, replicate: int, shard: int, tp: int) -> DeviceMesh:
    """One mesh for every dimension; tp innermost so a tensor-parallel group shares a node, pp
    outermost so only point-to-point stage traffic crosses the slowest links."""
    return init_device_mesh(device.type, (pp, replicate, shard, tp), mesh_dim_names=MESH_DIMS)
