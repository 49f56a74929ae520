"""``LocalAdamW``: torch's AdamW, stepping the local tensors of DTensor parameters.

FSDP and tensor parallelism leave parameters, gradients and AdamW's moments as DTensors, and
torch's AdamW sends its one fused (or foreach) call per parameter group through DTensor's
dispatch, which unwraps every tensor of every list, a cost that grows with the tensor count
(benchmarks/sharded-optimizer-cpu-xeon-amx-2026-12-01.md). AdamW is elementwise, so
on each rank's shard or replica it computes what the dispatch would once every gradient is laid
out like its parameter: a gradient that is not (a replicated gradient of a sharded parameter, a
partial sum) is redistributed first, as the dispatch would. Plain parameters (a mixture of
experts kept whole under tensor parallelism) step beside DTensor ones. The state is torch's,
DTensors included, so checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam


class LocalAdamW(torch.optim.AdamW):
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if isinstance(grad, DTensor) and not _laid_out_alike(param, grad):
                    # As DTensor's dispatch would: a replicated gradient of a sharded parameter
                    # (a vocabulary-split table's, under tensor parallelism) is cut here.
                    param.grad = grad.redistribute(param.device_mesh, param.placements)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # As Adam.step gathers them.
            tensors: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
            has_complex = self._init_group(group, *tensors)
            beta1, beta2 = group["betas"]
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = (
                [_local(t) for t in listed] for listed in tensors
            )
            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                has_complex=has_complex,
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return loss


def _laid_out_alike(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether elementwise work on the local tensors of ``param`` and ``grad`` is the work on the
    whole tensors: both plain, or both DTensors on one mesh with the same placements, none
    partial."""
    if not isinstance(param, DTensor) or not isinstance(grad, DTensor):
        return not isinstance(param, DTensor) and not isinstance(grad, DTensor)
    return (
        param.device_mesh == grad.device_mesh
        and param.placements == grad.placements
        and not any(p.is_partial() for p in grad.placements)
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor  # free without autograd
