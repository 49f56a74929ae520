"""Materialize a model built on the meta device: each rank allocates only its own share of every
parameter, after the parallelisms have cut it, and fills it from a ``ParamSource``.

No rank ever holds the whole model: a tensor-parallel slice, an FSDP shard or a pipeline stage
asks the source for exactly the indices it keeps. The source's values are a function of the full
model's parameter name and indices (``clusterlm.models.init``), so every layout starts from the
same weights as one process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Replicate, Shard

from clusterlm.models.init import ParamSource
from clusterlm.parallel.state_dict import TIED_COPIES

# Modules that wrappers insert into parameter names (activation checkpointing, torch.compile, DDP).
WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "module"}


def canonical_name(name: str, tied_embeddings: bool) -> str:
    """The full model's name of a parameter of a wrapped part or a pipeline stage: wrappers'
    segments dropped, and a last stage's copy of a tied token table named as the table."""
    name = ".".join(segment for segment in name.split(".") if segment not in WRAPPER_SEGMENTS)
    return TIED_COPIES.get(name, name) if tied_embeddings else name


def _runs(indices: torch.Tensor) -> list[tuple[slice, slice]]:
    """Split sorted-in-runs global indices into (local slice, global slice) pairs of consecutive
    runs."""
    runs, start = [], 0
    values = indices.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((slice(start, i), slice(values[start], values[i - 1] + 1)))
            start = i
    return runs


def _global_indices(param: DTensor) -> list[torch.Tensor]:
    """For each dimension, the global indices this rank's local tensor holds, in order."""
    shape, placements = tuple(param.shape), param.placements
    # Exact types: not a subclass such as a strided shard.
    if all(type(p) in (Shard, Replicate) for p in placements):
        local_shape, offset = compute_local_shape_and_global_offset(
            shape, param.device_mesh, placements
        )
        return [torch.arange(o, o + n) for o, n in zip(offset, local_shape, strict=True)]
    # Strided shards (FSDP over tensor-parallel slices) are not contiguous: let DTensor place an
    # index tensor the way it places the parameter. Which indices of dimension d a rank holds does
    # not depend on the other dimensions' sizes, so those shrink to the mesh size: every rank
    # still gets a non-empty piece of them, and the index tensor stays small.
    ranks = param.device_mesh.size()
    indices = []
    for dim, size in enumerate(shape):
        skinny = [size if d == dim else ranks for d in range(len(shape))]
        view = [size if d == dim else 1 for d in range(len(shape))]
        positions = torch.arange(size, dtype=torch.int32).view(view).expand(skinny)
        local = distribute_tensor(
            positions, param.device_mesh, placements, src_data_rank=None
        ).to_local()
        first = tuple(slice(None) if d == dim else 0 for d in range(len(shape)))
        indices.append(
            local[first].to(torch.int64) if local.numel() else torch.empty(0, dtype=torch.int64)
        )
    return indices


def _index_runs(param: torch.Tensor) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(local index, global index) pairs whose values together fill this rank's part of
    ``param``."""
    if not isinstance(param, DTensor):
        whole = tuple(slice(0, n) for n in param.shape)
        return [(whole, whole)]
    per_dim = [_runs(indices) for indices in _global_indices(param)]
    if any(not runs for runs in per_dim):
        return []  # this rank holds an empty shard
    return [tuple(zip(*combination, strict=True)) for combination in itertools.product(*per_dim)]


def _tied_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, name, owner, owner's name) for every parameter that is another's (a tied table)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is None:
                continue
            if id(param) in first:
                ties.append((sub, name, *first[id(param)]))
            else:
                first[id(param)] = (sub, name)
    return ties


@torch.no_grad()
def materialize(
    module: nn.Module,
    source: ParamSource | None,
    device: torch.device,
    canonical: Callable[[str], str] = str,
) -> None:
    """Allocate ``module``'s meta parameters on ``device`` (this rank's shards only) and fill them
    from ``source``; rebuild computed buffers. A module already materialized is left alone (and
    needs no ``source``)."""
    if not any(param.is_meta for param in module.parameters()):
        return
    assert source is not None, "a module on the meta device takes its values from a source"
    ties = _tied_parameters(module)
    module.to_empty(device=device)
    for user, name, owner, owner_name in ties:  # to_empty allocates each occurrence separately
        user._parameters[name] = owner._parameters[owner_name]
    for name, param in module.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        for local_index, global_index in _index_runs(param):
            values = source(canonical(name), tuple(param.shape), global_index)
            local[local_index].copy_(values)
    for sub in module.modules():
        init_buffers = getattr(sub, "init_buffers", None)
        if callable(init_buffers):
            init_buffers()
