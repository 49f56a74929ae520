"""AdamW with decoupled weight decay on matrices only, and the warm-up + decay LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from clusterlm.config import OptimConfig
from clusterlm.models import Transformer


def build_optimizer(model: nn.Module, cfg: OptimConfig, shard_state: bool = False) -> torch.optim.Optimizer:
    """Weight decay applies to the weights of linear layers; norms, biases and embedding tables
    are not decayed (decaying them only pulls them towards zero without regularizing).
    Decided by module type, so it holds under any parallel wrapping. ``shard_state`` (ZeRO stage 1)
    keeps each parameter's AdamW state on one data-parallel rank only."""
    decay_ids = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)
    }
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A last pipeline stage of a tied model holds its own copy of the token table as the output
    # projection: it must be treated like the table it copies.
    embedding_ids |= {
        id(m.output.weight) for m in model.modules()
        if isinstance(m, Transformer) and m.args.tie_embeddings and m.output is not None
    }
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied matrix once
        if not param.requires_grad:
            continue
        wanted = id(param) in decay_ids and id(param) not in embedding_ids
        (decay if wanted else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    options = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": cfg.fused or None}
    if shard_state:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


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
