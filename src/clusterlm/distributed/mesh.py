"""The one device mesh that names every parallel dimension: ``pp x dp_replicate x dp_shard x cp x
tp``. Its degrees are worked out and checked from the config alone (``clusterlm.config.degrees``).

The ranks of a context-parallel group hold the same weights, so they reduce gradients with the
data-parallel ranks, as torchtitan does: ``dp_shard_cp`` (FSDP shards over dp_shard x cp) and
``dp_cp`` (every rank holding a copy of a tensor-parallel shard: DDP's group) are the flattened
dimensions the data-parallel wrappers use (``weight_sharing_mesh``)."""

from __future__ import annotations

import weakref

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
        # Kept here rather than sliced from the root mesh by name, which torch deprecates for
        # flattened dimensions.
        copies = mesh[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp")
        _WEIGHT_SHARING[mesh] = {
            "ddp": copies,
            "fsdp": mesh[("dp_shard", "cp")]._flatten("dp_shard_cp"),
            "hsdp": copies._unflatten(0, (replicate, shard * cp), ("dp_replicate", "dp_shard_cp")),
        }
    return mesh


# root mesh -> its meshes of the ranks that share weights, where context parallelism adds ranks
_WEIGHT_SHARING: weakref.WeakKeyDictionary[DeviceMesh, dict[str, DeviceMesh]] = (
    weakref.WeakKeyDictionary()
)


def weight_sharing_mesh(mesh: DeviceMesh, kind: str) -> DeviceMesh:
    """The ranks that hold copies of the same weights (or shards of them), as ``kind`` of data
    parallel wraps them: ``ddp`` all copies, ``fsdp`` the ranks one tensor is sharded over,
    ``hsdp`` replicas x shards (2-D). Context-parallel ranks count as data-parallel ranks."""
    shared = _WEIGHT_SHARING.get(mesh)
    if shared is not None:
        return shared[kind]
    names: dict[str, str | tuple[str, ...]] = {
        "ddp": "dp_replicate",
        "fsdp": "dp_shard",
        "hsdp": ("dp_replicate", "dp_shard"),
    }
    return mesh[names[kind]]


def context_parallel_size(mesh: DeviceMesh) -> int:
    """The size of the mesh's ``cp`` dimension (1 for a mesh built without one)."""
    return mesh["cp"].size() if "cp" in (mesh.mesh_dim_names or ()) else 1
