"""Data parallelism on the device mesh: every rank computes gradients on its slice of the global
batch and all ranks apply the same update.

- ``ddp``:   ``DistributedDataParallel``: gradients all-reduced in buckets while backward runs.
- ``zero1``: DDP gradients, optimizer state sharded (``ZeroRedundancyOptimizer``; ZeRO stage 1).
- ``zero2``: FSDP2 ``fully_shard`` keeping parameters gathered between forward and backward
             (``reshard_after_forward=False``): gradients and optimizer state sharded (stage 2).
- ``zero3``: FSDP2 per unit of blocks, parameters resharded after forward except where backward
             starts (the last unit and the root): everything sharded (stage 3).
- ``hsdp``:  zero3 inside each ``dp_shard`` group, replicated across ``dp_replicate`` groups.

The mesh is ``dp_replicate x dp_shard``; degree 1 everywhere is the single-process case.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from clusterlm.comm.hooks import CommHookState, register_comm_hook
from clusterlm.comm.ring_reduce_scatter import use_ring_reduce_scatter
from clusterlm.config import CommConfig, ParallelConfig
from clusterlm.config.degrees import REPLICATING
from clusterlm.distributed.mesh import context_parallel_size, weight_sharing_mesh
from clusterlm.models import model_layers
from clusterlm.parallel.expert_parallel import expert_data_mesh, expert_parallel_modules

SHARDED = ("zero2", "zero3", "hsdp")
# Each rank trains its own replica; they synchronize outside backward (clusterlm.parallel.local_sgd,
# clusterlm.parallel.ps), so nothing wraps the model.
INDEPENDENT = ("local_sgd", "diloco", "ps")
# The FSDP units (one module of each) that keep their gathered weights from forward to backward:
# they also keep them from one micro-batch to the next (``gradient_sync``).
_KEPT_GATHERED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _ShardOptions(TypedDict, total=False):
    """What every ``fully_shard`` call of a model is given besides its resharding."""

    mesh: DeviceMesh
    mp_policy: MixedPrecisionPolicy
    offload_policy: OffloadPolicy


def apply_data_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    comm: CommConfig,
    param_dtype: torch.dtype | None,
) -> tuple[nn.Module, CommHookState | None]:
    """Wrap ``model`` for ``cfg.data_parallel``; returns it with the state of its gradient
    communication hook (bytes sent), if ``comm`` asked for one. ``param_dtype`` is the compute
    dtype under mixed precision: FSDP gathers parameters in it and reduces gradients in fp32.
    ``comm`` picks the all-reduce algorithm and compression of DDP's gradient buckets, and FSDP's
    reduce-scatter."""
    copies = mesh["dp_replicate"].size() * mesh["dp_shard"].size() * context_parallel_size(mesh)
    if copies == 1 or cfg.data_parallel in INDEPENDENT:
        return model, None  # one data-parallel rank, or replicas that synchronize outside backward
    if cfg.data_parallel in REPLICATING:
        return _apply_ddp(model, mesh, cfg, comm)
    dp_mesh = weight_sharing_mesh(mesh, "hsdp" if cfg.data_parallel == "hsdp" else "fsdp")
    options: _ShardOptions = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
    }
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    _shard_experts(model, mesh, cfg, options)
    blocks = list(model_layers(model).values())
    block_bytes = [4 * sum(p.numel() for p in block.parameters()) for block in blocks]
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    units = fsdp_units(block_bytes, model_bytes, cfg.bucket_mb * 2**20)
    for index, unit in enumerate(units):
        resharded = reshards_after_forward(cfg.data_parallel, index, len(units))
        fully_shard(
            [blocks[i] for i in unit] if len(unit) > 1 else blocks[unit[0]],
            **options,
            reshard_after_forward=resharded,
        )
        if not resharded:
            _KEPT_GATHERED.add(blocks[unit[0]])  # the unit's blocks share one FSDP state
    # Embeddings, final norm and head form the root unit, which backward needs first: resharded
    # after forward, it would be gathered again at once (torch's own default for the root).
    fully_shard(model, **options, reshard_after_forward=False)
    _KEPT_GATHERED.add(model)
    on_gloo = dist.get_backend(mesh["dp_shard"].get_group()) == "gloo"
    if comm.reduce_scatter == "ring" or (comm.reduce_scatter == "auto" and on_gloo):
        use_ring_reduce_scatter(model)
    return model, None


def _shard_experts(
    model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, options: _ShardOptions
) -> None:
    """Expert parallelism's experts, units of their own sharded over the ranks that hold the same
    experts (``expert_units``); their gradients sum the tokens of every data-parallel rank already
    (through the all-to-all), so the reduction divides by the whole data-parallel degree."""
    experts = expert_parallel_modules(model)
    if not experts:
        return
    experts_mesh = expert_data_mesh(mesh, cfg.ep, cfg.data_parallel)
    expert_options: _ShardOptions = {**options, "mesh": experts_mesh}
    shard_ranks = mesh["dp_shard"].size()
    resharded = cfg.data_parallel != "zero2"
    local_bytes = [4 * sum(_local(p).numel() for p in m.parameters()) for m in experts]
    for unit in expert_units(local_bytes, experts_mesh.size(), cfg.bucket_mb * 2**20):
        first = experts[unit[0]]
        members: list[nn.Module] = [experts[i] for i in unit]
        fully_shard(
            members if len(unit) > 1 else first, **expert_options, reshard_after_forward=resharded
        )
        assert isinstance(first, FSDPModule)
        first.set_gradient_divide_factor(float(mesh["dp_replicate"].size() * shard_ranks))
        # Sum, then divide: gloo and the ring have no pre-multiplied sum. (Without a shard group
        # to reduce over, FSDP divides as it copies, and would divide twice.)
        first.set_force_sum_reduction_for_comms(experts_mesh.size(-1) > 1)
        if not resharded:
            _KEPT_GATHERED.add(first)


def _local(param: nn.Parameter) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def expert_units(local_bytes: list[int], shard_ranks: int, min_bytes: float) -> list[list[int]]:
    """Which MoE blocks' experts (by index) form each FSDP unit, from the bytes of this rank's
    experts of each: by the blocks' rule (``fsdp_units``) over the expert-data-parallel group,
    all of them in one unit where that rule leaves none (they are never part of the root unit,
    whose mesh differs). A group of one rank has nothing to shard or reduce, so nothing to overlap
    with compute either: one unit, whose hooks run once a step instead of once a block."""
    everything = [list(range(len(local_bytes)))]
    if shard_ranks == 1:
        return everything
    return fsdp_units(local_bytes, sum(local_bytes), min_bytes) or everything


def reshards_after_forward(data_parallel: str, unit: int, units: int) -> bool:
    """Whether FSDP unit ``unit`` of ``units`` (blocks, in forward order) frees its gathered weights
    after forward and gathers them again for backward. zero2 keeps every unit's: only gradients
    and optimizer state stay sharded. zero3 frees all but the last unit's, where backward starts
    (its weights would be gathered again at once), as torchtitan does."""
    return data_parallel != "zero2" and unit < units - 1


def fsdp_units(block_bytes: list[int], model_bytes: float, min_bytes: float) -> list[list[int]]:
    """Which blocks (by index) form each FSDP unit besides the root, from their fp32 parameter
    bytes: consecutive blocks up to at least ``min_bytes`` (``parallel.bucket_mb``, the size DDP's
    buckets use). A unit is one all-gather and one reduce-scatter: blocks of a large model are
    units of their own, so communication overlaps compute block by block, while a model of less
    than ``min_bytes`` in all is the root unit alone, sparing the per-collective latency that
    dominates there. The planner counts collectives by the same rule."""
    if model_bytes < min_bytes:
        return []
    units: list[list[int]] = [[]]
    size = 0
    for index, nbytes in enumerate(block_bytes):
        if size >= min_bytes:
            units.append([])
            size = 0
        units[-1].append(index)
        size += nbytes
    return [unit for unit in units if unit]


def _apply_ddp(
    model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, comm: CommConfig
) -> tuple[nn.Module, CommHookState | None]:
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    ddp = DistributedDataParallel(
        model,
        device_ids=device_ids,
        process_group=weight_sharing_mesh(mesh, "ddp").get_group(),
        bucket_cap_mb=cfg.bucket_mb,
    )
    _settle_buckets(ddp)
    if comm.allreduce == "native" and comm.compression == "none":
        return ddp, None
    presets: dict[str, dict[str, Any]] = {
        "powersgd": {"rank": comm.powersgd_rank},
        "topk": {"ratio": comm.topk_ratio},
    }
    options = presets.get(comm.compression, {})
    return ddp, register_comm_hook(
        ddp, comm.allreduce, comm.compression, compression_options=options
    )


def _settle_buckets(ddp: DistributedDataParallel) -> None:
    """DDP lays its gradient buckets out anew, in backward order, after the first backward. Run
    that backward here, on zeros, so every training step, the first after a resume included,
    reduces in one layout: with more than two ranks the all-reduce's order of summation depends
    on it, and a resumed run must end with the uninterrupted run's weights bit for bit."""
    # Two tokens: the encoder-decoder reads a row as its source's half, then its target's.
    tokens = torch.zeros(1, 2, dtype=torch.long, device=next(ddp.parameters()).device)
    ddp(tokens).float().sum().mul(0).backward()
    ddp.zero_grad(set_to_none=True)


def build_optimizer(recipe: Any, shard_state: bool) -> torch.optim.Optimizer:
    """The optimizer a recipe describes (``param_groups``, ``optimizer_class``, ``options``);
    ``shard_state`` (ZeRO stage 1) keeps each parameter's state on one data-parallel rank only."""
    if shard_state:
        # Bucket views: after its step each rank broadcasts its parameters as one flat buffer per
        # rank instead of tensor by tensor, a few collectives instead of hundreds.
        return ZeroRedundancyOptimizer(
            recipe.param_groups,
            optimizer_class=recipe.optimizer_class,
            parameters_as_bucket_view=True,
            **recipe.options,
        )
    return recipe.build()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool, even: bool = True) -> Iterator[None]:
    """Gradient-accumulation micro-steps run with ``enabled=False``. DDP's gradients then accumulate
    locally and are all-reduced once, in the last micro-step's backward. FSDP's are reduce-scattered
    in every micro-step, so that each rank only ever holds its shard (ZeRO's gradient sharding,
    which the planner's memory model counts on); only hsdp's all-reduce across replicas waits for
    the last micro-step. The units that keep their weights from forward to backward (all of
    zero2's; zero3's root and last unit) keep them until the last micro-step's backward too: one
    gather a step instead of one per micro-step, at no more peak memory, since every micro-step
    holds them through its forward and backward anyway. Ranks that run different numbers of
    micro-steps (``even=False``: load balancing) cannot meet in a collective per micro-step: FSDP
    then reduces once, at the end (``gathered_for_accumulation``)."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule) and even:
        # Every unit kept gathered was sharded when it was added.
        kept: list[FSDPModule] = [
            unit
            for unit in model.modules()
            if isinstance(unit, FSDPModule) and unit in _KEPT_GATHERED
        ]
        _pause_fsdp_sync(model, kept, paused=True)
        try:
            yield
        finally:
            _pause_fsdp_sync(model, kept, paused=False)
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _pause_fsdp_sync(model: FSDPModule, kept: list[FSDPModule], paused: bool) -> None:
    """Before (``paused``) and after a micro-step that is not the last: hsdp's all-reduce across
    replicas waits, and the ``kept`` units do not reshard after backward."""
    model.set_requires_all_reduce(not paused)
    for unit in kept:
        unit.set_reshard_after_backward(not paused, recurse=False)


@contextlib.contextmanager
def gathered_for_accumulation(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP gathers parameters per micro-batch, a collective every rank must join as often as the
    others; ranks with different numbers of micro-batches (load balancing) gather once for the
    whole step instead, keep parameters whole until its end, then reshard. DDP needs nothing."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    if not units:
        yield
        return
    assert isinstance(model, FSDPModule)  # the root is a unit of its own (``apply_data_parallel``)
    model.set_reshard_after_forward(False)  # for the rest of the run: resharding is done here
    model.set_reshard_after_backward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
