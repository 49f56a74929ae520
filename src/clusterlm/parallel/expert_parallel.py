"""Expert parallelism: each mixture-of-experts block's ``E`` experts split over ``parallel.ep``
ranks borrowed from data parallelism, as torchtitan does.

The ``dp_shard`` dimension of the mesh is seen as ``dp_shard_mod_ep x ep``. Each rank of an ``ep``
group holds ``E / ep`` consecutive experts: the stacked weights become DTensors ``Shard(0)`` on the
``ep`` mesh, so a checkpoint stores the whole ``[E, ...]`` tensors and loads into any ep. The
router stays replicated: every rank routes its own tokens, sorts them by expert as one process
does, and an all-to-all sends each run of tokens to the rank holding its expert; the outputs come
back by the reverse all-to-all, in the order they left.

Gradients: the non-expert parameters are reduced over the whole data-parallel group as before;
the experts' by FSDP over the expert-data-parallel group (``dp_shard_mod_ep``, with
``dp_replicate`` under hsdp) only, since the ``ep`` ranks of a group hold different experts.
Their gradients already sum the contributions of the tokens of the whole ``ep`` group, so the
reduction divides by the whole data-parallel degree, not the expert-data-parallel one. The
routing loads are counted by each rank for all ``E`` experts and summed over every data-parallel
rank (``clusterlm.parallel.expert_balance``), so the routing biases match one process.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from clusterlm.models.moe import GroupedExperts, swiglu_experts

EXPERT_MESH_DIMS = ("dp_shard_mod_ep", "ep")


class AllToAllTimer:
    """Seconds spent in the experts' all-to-all exchanges (dispatch and combine, forward and
    backward), for ``bench train``."""

    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        seconds, cls.seconds = cls.seconds, 0.0
        return seconds


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    start = time.perf_counter()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    AllToAllTimer.seconds += time.perf_counter() - start
    return out


class _Exchange(torch.autograd.Function):
    """All-to-all of rows: ``in_splits[j]`` rows go to rank j, ``out_splits[i]`` come from rank i;
    the gradient goes back the same way reversed."""

    @staticmethod
    def forward(ctx: Any, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """``x``'s rows exchanged between the ranks of ``group``, differentiably."""
    return _Exchange.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(GroupedExperts):
    """``GroupedExperts`` whose weights hold this rank's ``E / ep`` experts: tokens sorted by
    global expert go to their experts' ranks and come back, in order."""

    ep_group: dist.ProcessGroup

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ranks = dist.get_world_size(self.ep_group)
        sent = counts.view(ranks, -1)  # [destination rank, its local expert]
        received = _all_to_all(sent, [1] * ranks, [1] * ranks, self.ep_group)
        in_splits, out_splits = sent.sum(1).tolist(), received.sum(1).tolist()
        arrived = exchange(tokens, out_splits, in_splits, self.ep_group)
        # Arrived by source rank, then expert: group them by expert for the grouped multiply.
        local = torch.arange(sent.size(1), device=counts.device).repeat(ranks)
        order = local.repeat_interleave(received.flatten()).argsort(stable=True)
        stacked = (self.w1, self.w3, self.w2)
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in stacked)
        out = swiglu_experts(arrived[order], received.sum(0), w1, w3, w2)
        return exchange(out[order.argsort()], in_splits, out_splits, self.ep_group)


def expert_mesh(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """``mesh`` with ``dp_shard`` seen as ``dp_shard_mod_ep x ep``. (torch has no public way to
    split a mesh dimension; sub-meshes of one root mesh are what FSDP needs to shard DTensors
    over a second dimension.)"""
    shard = mesh["dp_shard"].size()
    return mesh._unflatten("dp_shard", (shard // ep, ep), EXPERT_MESH_DIMS)


def expert_data_mesh(mesh: DeviceMesh, ep: int, data_parallel: str) -> DeviceMesh:
    """The mesh FSDP shards and reduces the experts over: the ranks holding the same experts."""
    split = expert_mesh(mesh, ep)
    if data_parallel == "hsdp":
        return split[("dp_replicate", "dp_shard_mod_ep")]
    return split["dp_shard_mod_ep"]


def expert_parallel_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh, ep: int) -> None:
    """Split every MoE block's experts of ``model`` over the ``ep`` ranks of ``mesh``'s
    ``dp_shard`` dimension (before data parallel, which then shards the experts over the
    expert-data-parallel group: ``expert_data_mesh``)."""
    ep_mesh = expert_mesh(mesh, ep)["ep"]
    for module in list(model.modules()):
        if type(module) is not GroupedExperts:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            shard = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(shard, param.requires_grad))
        module.__class__ = ExpertParallelExperts
        assert isinstance(module, ExpertParallelExperts)
        module.ep_group = ep_mesh.get_group()
