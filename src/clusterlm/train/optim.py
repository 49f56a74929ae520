"""AdamW (or SGD) with weight decay on matrices only, and the warm-up + decay LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clusterlm.config import OptimConfig
from clusterlm.models import Transformer
from clusterlm.models.moe import GroupedExperts
from clusterlm.parallel.local_adamw import LocalAdamW


@dataclass
class OptimizerRecipe:
    """What to build, left to the parallel strategy to build it (ZeRO-1 shards its state)."""

    param_groups: list[dict[str, Any]]
    optimizer_class: type[torch.optim.Optimizer]
    options: dict[str, Any]

    def build(self) -> torch.optim.Optimizer:
        return self.optimizer_class(self.param_groups, **self.options)


def optimizer_recipe(model: nn.Module, cfg: OptimConfig) -> OptimizerRecipe:
    """AdamW (``LocalAdamW``: torch's, stepping DTensors' local tensors) or SGD (``optim.optimizer =
    sgd``) over ``model``'s parameters. Weight decay applies to the weights of linear layers; norms,
    biases and embedding tables are not decayed (decaying them only pulls them towards zero without
    regularizing). Decided by module type, so it holds under any parallel wrapping."""
    decay_ids = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    decay_ids |= {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A last pipeline stage of a tied model holds its own copy of the token table as the output
    # projection: it must be treated like the table it copies.
    embedding_ids |= {
        id(m.output.weight)
        for m in model.modules()
        if isinstance(m, Transformer) and m.args.tie_embeddings and m.output is not None
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # parameters() yields a tied matrix once
        if not param.requires_grad:
            continue
        wanted = id(param) in decay_ids and id(param) not in embedding_ids
        (decay if wanted else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return OptimizerRecipe(groups, torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum})
    options = {
        "lr": cfg.lr,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
        "fused": cfg.fused or None,
    }
    return OptimizerRecipe(groups, LocalAdamW, options)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr``, then a
    cosine or linear decay to ``min_lr`` at ``decay_steps``, flat after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    end = cfg.decay_steps or total_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape
