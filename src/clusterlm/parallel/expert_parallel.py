"""Expert parallelism: each mixture-of-experts block's ``E`` experts split over ``parallel.ep``
ranks borrowed from data parallelism, as torchtitan does.

The ``dp_shard`` dimension of the mesh is seen as ``dp_shard_mod_ep x ep``. Each rank of an ``ep``
group holds ``E / ep`` consecutive experts: the stacked weights become DTensors ``Shard(0)`` on the
``ep`` mesh, so a checkpoint stores the whole ``[E, ...]`` tensors and loads into any ep. The
router stays replicated: every rank routes its own tokens, sorts them by expert as one process
does, and an all-to-all sends each run of tokens to the rank holding its expert; the outputs come
back by the reverse all-to-all, in the order they left. The shared experts run while the tokens
travel to the experts, forward and backward (``Transfer``), as Megatron-LM's shared-expert overlap.

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
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from clusterlm.models.moe import GroupedExperts, swiglu_experts

EXPERT_MESH_DIMS = ("dp_shard_mod_ep", "ep")


class AllToAllTimer:
    """Seconds spent starting and waiting for the experts' all-to-all exchanges (counts, dispatch
    and combine, forward and backward), for ``bench train``; not the part the shared experts
    hide."""

    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        seconds, cls.seconds = cls.seconds, 0.0
        return seconds


class _Started:
    """An all-to-all under way (``async_op``): its output, to read after ``wait``."""

    def __init__(
        self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
    ):
        start = time.perf_counter()
        self.out: torch.Tensor | None = x.new_empty((sum(out_splits), *x.shape[1:]))
        self.work: dist.Work | None = dist.all_to_all_single(
            self.out, x.contiguous(), out_splits, in_splits, group=group, async_op=True
        )
        self.issued = time.perf_counter() - start

    def wait(self) -> torch.Tensor:
        """The output. The work and the output are forgotten here: autograd's nodes hold this
        object, and the output (which the work holds too) holds a node, a cycle that would keep
        every step's exchanges alive."""
        start = time.perf_counter()
        work, self.work = self.work, None
        out, self.out = self.out, None
        assert out is not None, "an all-to-all waited on twice"
        if work is not None:
            work.wait()
        AllToAllTimer.seconds += self.issued + time.perf_counter() - start
        return out


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    return _Started(x, out_splits, in_splits, group).wait()


class Transfer:
    """An all-to-all of rows, ``in_splits[j]`` to rank j and ``out_splits[i]`` from rank i, whose
    gradient goes back the same way reversed; differentiable, in two halves so that work placed
    between them runs while the rows travel: ``start`` sends (and, in backward, waits for the
    gradients), ``finish`` waits for the rows (and, in backward, sends the gradients). Autograd
    runs backward in reverse order of forward, so what ran between the halves in forward runs
    between them in backward too."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.forward: _Started | None = None
        self.backward: _Started | None = None

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """A token of the rows under way (empty; it carries autograd's link to ``x``), for
        ``finish``."""
        return _Send.apply(x, self)

    def finish(self, sent: torch.Tensor) -> torch.Tensor:
        """The rows arrived."""
        return _Receive.apply(sent, self)


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, transfer):
        ctx.transfer = transfer
        transfer.forward = _Started(x, transfer.out_splits, transfer.in_splits, transfer.group)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _):
        return ctx.transfer.backward.wait(), None


class _Receive(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, sent, transfer):
        ctx.transfer = transfer
        return transfer.forward.wait()

    @staticmethod
    def backward(ctx: Any, grad):
        t = ctx.transfer
        t.backward = _Started(grad, t.in_splits, t.out_splits, t.group)
        return grad.new_empty(0), None


def exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """``x``'s rows exchanged between the ranks of ``group``, differentiably."""
    transfer = Transfer(out_splits, in_splits, group)
    return transfer.finish(transfer.start(x))


class _Permute(torch.autograd.Function):
    """``x[order]`` for a permutation ``order`` whose inverse is ``inverse``: backward gathers
    too, where indexing would scatter-add into zeros."""

    @staticmethod
    def forward(ctx: Any, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _by_local_expert(received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The order that groups rows arrived by source rank, then local expert (``received`` [source
    rank, local expert] rows), by local expert; and its inverse."""
    local = torch.arange(received.size(1), device=received.device).repeat(received.size(0))
    order = local.repeat_interleave(received.flatten()).argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


class ExpertParallelExperts(GroupedExperts):
    """``GroupedExperts`` whose weights hold this rank's ``E / ep`` experts: tokens sorted by
    global expert go to their experts' ranks and come back, in order. The work ``alongside`` runs
    while the tokens travel to the experts, and its backward while their gradients travel back."""

    ep_group: dist.ProcessGroup

    def forward(
        self,
        tokens: torch.Tensor,
        counts: torch.Tensor,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ranks = dist.get_world_size(self.ep_group)
        sent = counts.view(ranks, -1)  # [destination rank, its local expert]
        received = _all_to_all(sent, [1] * ranks, [1] * ranks, self.ep_group)
        in_splits, out_splits = sent.sum(1).tolist(), received.sum(1).tolist()
        dispatch = Transfer(out_splits, in_splits, self.ep_group)
        under_way = dispatch.start(tokens)
        beside = None if alongside is None else alongside()
        order, inverse = _by_local_expert(received)
        arrived = dispatch.finish(under_way)
        stacked = (self.w1, self.w3, self.w2)
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in stacked)
        # Arrived by source rank, then expert: grouped by expert for the grouped multiply.
        out = swiglu_experts(_Permute.apply(arrived, order, inverse), received.sum(0), w1, w3, w2)
        out = exchange(_Permute.apply(out, inverse, order), in_splits, out_splits, self.ep_group)
        return out, beside


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
