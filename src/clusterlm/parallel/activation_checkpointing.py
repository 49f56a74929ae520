"""Activation checkpointing of a plain Transformer's blocks: full or selective recomputation."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from clusterlm.models import model_layers

# Outputs worth keeping under selective checkpointing: the matmuls and attention, whose recompute
# costs FLOPs. Norms, activations, dropout and adds are recomputed: cheap, and most of the memory
# (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op not in SAVED_OPS or _draws_random_numbers(op, args, kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def _draws_random_numbers(op, args: tuple, kwargs: dict) -> bool:
    """Attention with dropout draws from the generator. The recompute restarts from the block's
    saved RNG state, so a random op it skips would shift every later dropout mask (seen on CUDA);
    such an op is recomputed instead, drawing the same numbers again."""
    names = [a.name for a in op._schema.arguments]
    if "dropout_p" not in names:
        return False
    index = names.index("dropout_p")
    return float(kwargs.get("dropout_p", args[index] if index < len(args) else 0.0)) > 0.0


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """``full``: keep only each block's input and recompute the block in backward (one more
    forward per block). ``selective``: keep the outputs of matmuls and attention, recompute the
    element-wise rest."""
    options: dict[str, Any] = {}  # for torch.utils.checkpoint.checkpoint
    if mode == "selective":
        options["context_fn"] = partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    layers = model_layers(model)
    for name, block in layers.named_children():
        layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=True, **options))
