"""Gradients across ranks after backward: clipping by the global 2-norm on each rank's local
shards, and the sequence-parallel partial sums reduced together (``reduce_partial_grads``).

``torch.nn.utils.clip_grad_norm_`` gives the same result on DTensor gradients (FSDP, tensor
parallel), but sends every per-tensor norm and scaling through DTensor's dispatch, a cost per
tensor (benchmarks/collectives-cpu-epyc-zen4-2026-12-01.md). Here the norms
and the scaling run on the local tensors with torch's fused (foreach) kernels, and one scalar
all-reduce per sharded mesh dimension makes the sum of squares global. The clip coefficient stays
a tensor, so no step waits for the host. All of it runs without autograd, as torch's clipping
does: ``DTensor.to_local`` is then an attribute read, where with autograd on it is a function call
(benchmarks/sharded-optimizer-cpu-xeon-amx-2026-12-01.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

# (mesh, mesh dimensions the gradient is sharded on); (None, ()) for plain tensors.
ShardKey = tuple[object, tuple[int, ...]]


@torch.no_grad()
def squared_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every entry of ``grads`` across the ranks that shard them (fp32, plain)."""
    local: dict[ShardKey, list[torch.Tensor]] = {}
    meshes: dict[ShardKey, DeviceMesh] = {}
    device = torch.device("cpu")
    for grad in grads:
        device = grad.device
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):  # not reduced yet: reduce a copy
                grad = grad.redistribute(
                    placements=[Replicate() if p.is_partial() else p for p in grad.placements]
                )
            # Every other placement splits the tensor (Shard, and FSDP's _StridedShard over tensor
            # parallelism, which is not a Shard).
            dims = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
            key: ShardKey = (id(grad.device_mesh), dims)
            meshes[key] = grad.device_mesh
            local.setdefault(key, []).append(grad.to_local())
        else:
            local.setdefault((None, ()), []).append(grad)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for key, tensors in local.items():
        squared = torch.nn.utils.get_total_norm(tensors, 2.0).float().square()
        for dim in key[1]:
            dist.all_reduce(squared, group=meshes[key].get_group(dim))
        total += squared
    return total


@torch.no_grad()
def reduce_partial_grads(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Reduce the gradients still partial sums over a mesh dimension (under sequence parallelism,
    those of the norms and row-parallel biases, which each rank computes from its slice of the
    sequence) in one flat all-reduce per mesh, dimension and dtype, and mark them replicated.
    Left partial, the optimizer and the clipping would each reduce them tensor by tensor: 2 x 26
    collectives a step on the nano model, as Megatron also avoids by reducing them together."""
    groups: dict[tuple, tuple[DeviceMesh, list[tuple[torch.nn.Parameter, DTensor]]]] = {}
    for param in parameters:
        grad = param.grad
        if not isinstance(grad, DTensor):
            continue
        partial = tuple(i for i, p in enumerate(grad.placements) if p.is_partial())
        ops = {
            cast(Partial, grad.placements[i]).reduce_op for i in partial
        }  # is_partial(): a Partial
        if len(ops) != 1 or not ops <= {"sum", "avg"}:
            continue  # nothing to reduce, or a reduction left to DTensor
        key = (id(grad.device_mesh), partial, ops.pop(), grad.dtype)
        groups.setdefault(key, (grad.device_mesh, []))[1].append((param, grad))
    for (_, dims, op, _), (mesh, pairs) in groups.items():
        local = [grad.to_local() for _, grad in pairs]
        flat = torch.cat([tensor.reshape(-1) for tensor in local])
        for dim in dims:
            dist.all_reduce(
                flat,
                op=dist.ReduceOp.AVG if op == "avg" else dist.ReduceOp.SUM,
                group=mesh.get_group(dim),
            )
        for (param, grad), shard, reduced in zip(
            pairs, local, flat.split([t.numel() for t in local]), strict=True
        ):
            placements = [Replicate() if p.is_partial() else p for p in grad.placements]
            param.grad = DTensor.from_local(
                reduced.view(shard.shape),
                mesh,
                placements,
                run_check=False,
                shape=grad.shape,
                stride=grad.stride(),
            )


@torch.no_grad()
def scale_grads(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Multiply every gradient by ``max_norm / total_norm`` where that is below 1."""
    coefficient = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        tensor = grad.to_local() if isinstance(grad, DTensor) else grad
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (device, dtype), tensors in groups.items():  # the fused kernel takes one device and dtype
        torch._foreach_mul_(tensors, coefficient.to(device, dtype))


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over parameters that may be sharded across ranks; returns the norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = squared_grad_norm(grads).sqrt()
    scale_grads(grads, total_norm, max_norm)
    return total_norm
