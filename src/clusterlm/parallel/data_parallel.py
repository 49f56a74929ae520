"""Data parallelism on the device mesh: every rank computes gradients on its slice of the global
batch and all ranks apply the same update.

- ``ddp``:   ``DistributedDataParallel``: gradients all-reduced in buckets while backward runs.
- ``zero1``: DDP gradients, optimizer state sharded (``ZeroRedundancyOptimizer``; ZeRO stage 1).
- ``zero2``: FSDP2 ``fully_shard`` keeping parameters gathered between forward and backward
             (``reshard_after_forward=False``): gradients and optimizer state sharded (stage 2).
- ``zero3``: FSDP2 per block, parameters resharded after forward: everything sharded (stage 3).
- ``hsdp``:  zero3 inside each ``dp_shard`` group, replicated across ``dp_replicate`` groups.

The mesh is ``dp_replicate x dp_shard``; degree 1 everywhere is the single-process case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from clusterlm.comm.hooks import register_comm_hook
from clusterlm.config import CommConfig, ParallelConfig
from clusterlm.errors import UserError

SHARDED = ("zero2", "zero3", "hsdp")


def resolve_degrees(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for the strategy; zeros are derived so that
    pp x dp_replicate x dp_shard x tp is the world size."""
    model_parallel = cfg.pp * cfg.tp
    if world_size % model_parallel:
        raise UserError(f"parallel.pp x parallel.tp ({cfg.pp} x {cfg.tp}) does not divide the {world_size} "
                        "processes of the job")
    world_size //= model_parallel
    replicate, shard = cfg.dp_replicate, cfg.dp_shard
    strategy = cfg.data_parallel
    if strategy in ("ddp", "zero1"):
        replicate, shard = replicate or world_size // max(shard, 1), shard or 1
        if shard != 1:
            raise UserError(f"parallel.data_parallel = {strategy} replicates only; set parallel.dp_shard = 1 "
                            "or use zero2/zero3/hsdp")
    elif strategy in ("zero2", "zero3"):
        replicate, shard = replicate or 1, shard or world_size // max(replicate, 1)
        if replicate != 1:
            raise UserError(f"parallel.data_parallel = {strategy} shards only; use hsdp to also replicate")
    else:  # hsdp
        if not replicate and not shard:
            raise UserError("parallel.data_parallel = hsdp needs parallel.dp_replicate or parallel.dp_shard")
        replicate = replicate or world_size // shard
        shard = shard or world_size // replicate
    if replicate * shard != world_size:
        raise UserError(
            f"parallel.pp ({cfg.pp}) x dp_replicate ({replicate}) x dp_shard ({shard}) x tp ({cfg.tp}) = "
            f"{replicate * shard * model_parallel} but the job has {world_size * model_parallel} processes; "
            "make the degrees multiply to the world size"
        )
    if model_parallel > 1 and replicate * shard > 1 and strategy in ("ddp", "zero1"):
        raise UserError(f"parallel.tp or parallel.pp > 1 composes with zero2, zero3 or hsdp data parallelism, "
                        f"not {strategy}")
    return replicate, shard


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(device: torch.device, pp: int, replicate: int, shard: int, tp: int) -> DeviceMesh:
    """One mesh for every dimension; tp innermost so a tensor-parallel group shares a node, pp
    outermost so only point-to-point stage traffic crosses the slowest links."""
    return init_device_mesh(device.type, (pp, replicate, shard, tp), mesh_dim_names=MESH_DIMS)


def apply_data_parallel(
    model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, comm: CommConfig, param_dtype: torch.dtype | None
) -> nn.Module:
    """Wrap ``model`` for ``cfg.data_parallel``. ``param_dtype`` is the compute dtype under mixed
    precision: FSDP gathers parameters in it and reduces gradients in fp32. ``comm`` picks the
    all-reduce algorithm and compression of DDP's gradient buckets."""
    if mesh["dp_replicate"].size() * mesh["dp_shard"].size() == 1:
        return model  # one data-parallel rank: nothing to reduce
    if cfg.data_parallel in ("ddp", "zero1"):
        device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
        ddp = DistributedDataParallel(
            model, device_ids=device_ids, process_group=mesh["dp_replicate"].get_group(),
            bucket_cap_mb=cfg.bucket_mb,
        )
        if comm.allreduce != "native" or comm.compression != "none":
            options = {"rank": comm.powersgd_rank} if comm.compression == "powersgd" else {}
            if comm.compression == "topk":
                options = {"ratio": comm.topk_ratio}
            register_comm_hook(ddp, comm.allreduce, comm.compression, compression_options=options)
        return ddp
    dp_mesh = mesh[("dp_replicate", "dp_shard")] if cfg.data_parallel == "hsdp" else mesh["dp_shard"]
    options = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        # zero2 keeps the gathered parameters from forward to backward: only gradients and
        # optimizer state stay sharded.
        "reshard_after_forward": cfg.data_parallel != "zero2",
    }
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **options)
    fully_shard(model, **options)  # embeddings, final norm and head form the root unit
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient-accumulation micro-steps run with ``enabled=False``: gradients accumulate locally
    and are reduced once, in the last micro-step's backward."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
