"""The experts' loads of a mixture of experts across data-parallel ranks.

After every optimizer step each MoE block's tokens per expert (``take_expert_stats``) are summed
over the data-parallel ranks; from those sums every rank moves the aux-free routing biases
(``update_router_biases``), so all ranks apply the same update and N ranks train as one process
does. The sums of a log window give the metrics: tokens per expert, the load imbalance (max over
mean) of each block, and the mean load-balancing loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from clusterlm.models.moe import MoE, auxiliary_loss, take_expert_stats, update_router_biases


def _layer_index(name: str) -> int:
    """The block index in a module's name such as ``layers.3.mlp`` (wrappers' segments aside)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


class ExpertLoads:
    """The aux-free bias update after each step, and the load figures of each log window."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh | None, device: torch.device):
        self.model, self.device = model, device
        self.layers = [_layer_index(n) for n, m in model.named_modules() if isinstance(m, MoE)]
        dims = ("dp_replicate", "dp_shard")
        self.groups = [mesh[d].get_group() for d in dims if mesh[d].size() > 1] if mesh else []
        self.window: torch.Tensor | None = None
        # What forwards before training recorded (DDP settles its buckets with one) is no load.
        take_expert_stats(model, device)
        auxiliary_loss(model)

    def after_step(self, applied: bool) -> None:
        """Sum the step's loads over the data-parallel ranks; where the optimizer step was
        ``applied`` (not skipped as non-finite), move the routing biases by them."""
        stats = take_expert_stats(self.model, self.device)
        for group in self.groups:
            dist.all_reduce(stats, group=group)
        if applied:
            update_router_biases(self.model, stats[:, :-2])
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
    model: nn.Module, mesh: DeviceMesh | None, device: torch.device
) -> ExpertLoads | None:
    """The load tracking of ``model``'s MoE blocks; None for a dense model."""
    has_experts = any(isinstance(module, MoE) for module in model.modules())
    return ExpertLoads(model, mesh, device) if has_experts else None
