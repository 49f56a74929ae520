"""The one device mesh that names every parallel dimension: ``pp x dp_replicate x dp_shard x cp x
tp``. Its degrees are worked out and checked from the config alone (``clusterlm.config.degrees``).

The ranks of a context-parallel group hold the same weights, so they reduce gradients with the
data-parallel ranks, as torchtitan does: ``dp_shard_cp`` (FSDP shards over dp_shard x cp) and
``dp_cp`` (every rank holding a copy of a tensor-parallel shard: DDP's group) are the flattened
dimensions the data-parallel wrappers use (``weight_sharing_dims``)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def build_mesh(
    device: torch.device, pp: int, replicate: int, shard: int, tp: int, cp: int = 1
) -> DeviceMesh:
    """One mesh for every dimension; tp innermost so a tensor-parallel group shares a node, pp
    outermost so only point-to-point stage traffic crosses the slowest links, cp next to tp: its
    attention traffic runs every layer."""
    mesh = init_device_mesh(device.type, (pp, replicate, shard, cp, tp), mesh_dim_names=MESH_DIMS)
    if cp > 1:
        mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
        mesh[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp")
    return mesh


def weight_sharing_dims(mesh: DeviceMesh) -> tuple[str, str]:
    """(the dimension FSDP shards over, the one DDP reduces over): with context parallelism the
    flattened ``dp_shard_cp`` and ``dp_cp``, else ``dp_shard`` and ``dp_replicate``."""
    if context_parallel_size(mesh) > 1:
        return "dp_shard_cp", "dp_cp"
    return "dp_shard", "dp_replicate"


def context_parallel_size(mesh: DeviceMesh) -> int:
    """The size of the mesh's ``cp`` dimension (1 for a mesh built without one)."""
    return mesh["cp"].size() if "cp" in (mesh.mesh_dim_names or ()) else 1
