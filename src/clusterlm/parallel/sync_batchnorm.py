"""Batch normalization whose statistics span every rank of a process group, on any device.

``torch.nn.SyncBatchNorm`` accepts only accelerator tensors. :class:`SyncBatchNorm` here runs
wherever ``torch.distributed`` does (gloo on CPU included) and is a drop-in for
``nn.BatchNorm{1,2,3}d``: same parameters, buffers and ``state_dict`` keys. In training mode it
normalizes with the mean and variance of the *global* batch (the union of every rank's batch) and
updates the running statistics exactly as ``nn.BatchNorm`` would on that global batch. In eval
mode, in a single process, or in a one-rank group it is ``nn.BatchNorm`` itself (no
communication). Use :func:`convert_sync_batchnorm` to swap the layers of an existing model.

Gradients and DDP: for the input, the backward pass returns the gradient of the sum of all
ranks' losses (the means over the global batch that batch norm's backward needs are all-reduced).
For ``weight`` and ``bias`` it returns this rank's local sums, the same kind of per-rank
contribution every other parameter gets; DDP's gradient averaging (sum over ranks divided by the
world size) then yields the global-batch gradient scaled by ``1 / world_size``, exactly as for
every other parameter. So DDP + :class:`SyncBatchNorm` with equal per-rank batches and a mean loss
trains like one process with ``nn.BatchNorm`` on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

# Layers convert_sync_batchnorm replaces; torch's own SyncBatchNorm is included because it cannot
# run on CPU at all.
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _per_channel(stat: Tensor, ndim: int) -> Tensor:
    """View a (C,) statistic so it broadcasts against an (N, C, *) input of ``ndim`` dimensions."""
    return stat.view(1, -1, *([1] * (ndim - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the global batch: one all-reduce forward, one backward (fp32 statistics)."""

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        average_factor: float,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        reduce_dims = [0, *range(2, input.dim())]
        x = input.float()
        local_count = input.numel() // input.size(1)
        # The global mean and variance (Ioffe & Szegedy 2015, eq. in Alg. 1) follow from the sums
        # count, sum(x) and sum(x^2) over ranks: mean = S1/n, var = S2/n - mean^2. That difference
        # cancels catastrophically in fp32 when |mean| >> std, so each rank first takes its local
        # moments with a two-pass var_mean and the exchange and combination run in fp64 (which
        # also keeps counts above 2^24 exact). Chan et al.'s pairwise (count, mean, M2) merge over
        # an all-gather is the alternative that avoids the subtraction entirely, at W x the traffic.
        if local_count > 0:
            local_var, local_mean = torch.var_mean(x, dim=reduce_dims, correction=0)
            local_mean, local_var = local_mean.double(), local_var.double()
        else:  # an empty batch contributes nothing but must still join the collective
            local_mean = local_var = x.new_zeros(input.size(1), dtype=torch.float64)
        count = torch.tensor([float(local_count)], dtype=torch.float64, device=input.device)
        sums = torch.cat(
            [count, local_count * local_mean, local_count * (local_var + local_mean**2)]
        )
        dist.all_reduce(sums, group=group)
        total = int(sums[0].item())
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                "got 1 across the process group"
            )
        mean, sum_squares = (sums[1:] / total).chunk(2)
        var = (sum_squares - mean**2).clamp_(min=0)

        # nn.BatchNorm leaves running statistics untouched on an empty batch; so do we.
        if running_mean is not None and running_var is not None and total > 0:
            unbiased_var = var * (total / (total - 1))
            running_mean.mul_(1 - average_factor).add_(average_factor * mean.to(running_mean.dtype))
            running_var.mul_(1 - average_factor).add_(
                average_factor * unbiased_var.to(running_var.dtype)
            )

        mean, invstd = mean.float(), torch.rsqrt(var + eps).float()
        out = (x - _per_channel(mean, x.dim())) * _per_channel(invstd, x.dim())
        if weight is not None:
            out = out * _per_channel(weight.float(), x.dim())
        if bias is not None:
            out = out + _per_channel(bias.float(), x.dim())

        # Save the input, not x_hat: recomputing x_hat in backward is cheap and, for bf16 inputs,
        # avoids keeping an fp32 copy of the activation alive.
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total, ctx.group = total, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        reduce_dims = [0, *range(2, input.dim())]
        ndim = input.dim()
        x_hat = (input.float() - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
        dy = grad_output.float()
        sum_dy = dy.sum(reduce_dims)
        sum_dy_x_hat = (dy * x_hat).sum(reduce_dims)

        grad_weight = sum_dy_x_hat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            # dL/dx = (w * invstd) * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over the
            # global batch: each output depends on every rank's inputs through mean and var.
            global_sums = torch.cat([sum_dy, sum_dy_x_hat])
            dist.all_reduce(global_sums, group=ctx.group)
            mean_dy, mean_dy_x_hat = (global_sums / ctx.total).chunk(2)
            scale = invstd if weight is None else weight.float() * invstd
            grad_input = _per_channel(scale, ndim) * (
                dy - _per_channel(mean_dy, ndim) - x_hat * _per_channel(mean_dy_x_hat, ndim)
            )
            grad_input = grad_input.to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """``nn.BatchNorm{1,2,3}d`` with training statistics over all ranks of ``process_group``.

    Accepts (N, C) and (N, C, *) inputs. ``process_group`` defaults to the whole world. A rank may
    have an empty batch (N = 0); it still takes part in both collectives, so every rank of the
    group must call forward and backward the same number of times, as with any collective.
    Statistics are computed in fp32 (fp64 for the cross-rank combination) whatever the input dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self._group_size() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        # Same running-average factor as nn.BatchNorm: momentum, or 1/t for momentum=None.
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            tracked = self.num_batches_tracked
            assert tracked is not None  # a buffer wherever running statistics are tracked
            tracked.add_(1)
            if self.momentum is None:
                average_factor = 1.0 / float(tracked)
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps,
            average_factor,
            self.process_group,
        )


def convert_sync_batchnorm(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` (and ``nn.SyncBatchNorm``) in ``module`` by
    :class:`SyncBatchNorm`, recursively, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    The new layers share the old layers' parameters and buffers (so ``requires_grad``, device,
    dtype and any optimizer holding them carry over) and copy eps, momentum, affine,
    track_running_stats and the training flag. Returns ``module`` itself, changed in place, or a
    new layer if ``module`` is itself a batch-norm layer.
    """
    converted = module
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device="meta",  # placeholders only: the old layer's tensors replace them below
            bias=module.bias is not None,
        )
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
