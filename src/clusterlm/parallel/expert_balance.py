"""The experts' loads of a mixture of experts across data-parallel ranks.

After every optimizer step each MoE block's tokens per expert (``take_expert_stats``) are summed
over the data-parallel ranks; from those sums every rank moves the aux-free routing biases
(``update_router_biases``), so all ranks apply the same update and N ranks train as one process
does. In a pipeline each stage fills the rows of its own blocks in a table of the whole model's,
summed over the stages too, so every rank reports every block. The sums of a log window give the
metrics: tokens per expert, the load imbalance (max over mean) of each block, and the mean
load-balancing loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage

from clusterlm.config import ModelConfig
from clusterlm.config.experts import moe_layer_indices
from clusterlm.models.moe import (
    MoE,
    auxiliary_loss,
    moe_blocks,
    take_expert_stats,
    update_router_biases,
)


def _layer_index(name: str) -> int:
    """The block index in a module's name such as ``layers.3.mlp`` (wrappers' segments aside)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def _moe_names(part: nn.Module) -> list[str]:
    return [name for name, module in part.named_modules() if isinstance(module, MoE)]


class ExpertLoads:
    """The aux-free bias update after each step, and the load figures of each log window."""

    def __init__(
        self,
        parts: list[nn.Module],
        model: ModelConfig,
        mesh: DeviceMesh | None,
        device: torch.device,
    ) -> None:
        self.device = device
        self.parts = [part for part in parts if moe_blocks(part)]  # pipeline stages may hold none
        self.layers = moe_layer_indices(model.moe_layers, model.n_layer)  # the whole model's
        self.width = model.moe_experts + 2
        # Rows of the whole model's table that this rank's blocks fill, part by part.
        self.rows = [
            [self.layers.index(_layer_index(name)) for name in _moe_names(part)]
            for part in self.parts
        ]
        # Summed over the data-parallel ranks, and over the pipeline stages for the whole model.
        dims = ("dp_replicate", "dp_shard", "pp")
        self.groups = [mesh[d].get_group() for d in dims if mesh[d].size() > 1] if mesh else []
        self.window: torch.Tensor | None = None
        # What forwards before training recorded (DDP settles its buckets with one) is no load.
        for part in self.parts:
            take_expert_stats(part, device)
            auxiliary_loss(part)

    def after_step(self, applied: bool) -> None:
        """Sum the step's loads over the data-parallel ranks; where the optimizer step was
        ``applied`` (not skipped as non-finite), move the routing biases by them."""
        stats = torch.zeros(len(self.layers), self.width, device=self.device)
        for part, rows in zip(self.parts, self.rows, strict=True):
            stats[rows] = take_expert_stats(part, self.device)
        for group in self.groups:
            dist.all_reduce(stats, group=group)
        if applied:
            for part, rows in zip(self.parts, self.rows, strict=True):
                update_router_biases(part, stats[rows, :-2])
        self.window = stats if self.window is None else self.window + stats

    def metrics(self) -> dict[str, Any]:
        """The figures of the steps since the last call."""
        if self.window is None:
            return {}
        window, self.window = self.window.cpu(), None
        loads = window[:, :-2]
        imbalance = loads.max(1).values / loads.mean(1).clamp_min(1e-9)
        record: dict[str, Any] = {
            "moe_aux_loss": float((window[:, -2] / window[:, -1].clamp_min(1)).mean()),
            "moe_load_imbalance": float(imbalance.max()),
            "moe_tokens_per_expert": {
                str(layer): [int(n) for n in loads[i]] for i, layer in enumerate(self.layers)
            },
        }
        for i, layer in enumerate(self.layers):
            record[f"moe_load_imbalance_layer{layer}"] = float(imbalance[i])
        return record


def expert_loads(
    parts: list[nn.Module], model: ModelConfig, mesh: DeviceMesh | None, device: torch.device
) -> ExpertLoads | None:
    """The load tracking of the MoE blocks of ``model``, whose ``parts`` (this rank's pipeline
    stages, or the whole model) this rank holds; None for a dense model."""
    return ExpertLoads(parts, model, mesh, device) if model.moe_experts else None


def forget_metadata_forward(stage: PipelineStage) -> None:
    """A pipeline stage runs its module once on placeholder inputs, in training mode, to learn
    the shapes it sends (in the first step): its MoE blocks must not count those tokens."""
    blocks = moe_blocks(stage.submod)
    if not blocks:
        return
    infer = stage._forward_metadata_inference

    def infer_and_forget(*args: Any, **kwargs: Any) -> Any:
        result = infer(*args, **kwargs)
        for block in blocks:
            block.stats = block.aux_loss = None
        return result

    stage._forward_metadata_inference = infer_and_forget  # type: ignore[method-assign]
