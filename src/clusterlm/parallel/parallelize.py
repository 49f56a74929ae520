"""Apply activation checkpointing and compilation to a plain Transformer, in place."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from clusterlm.config import Config


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of keeping them: memory per
    layer drops to the block's input, at the cost of one more forward per block."""
    for name, block in model.layers.named_children():
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=True))


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: every block has the same graph, so it compiles once and
    is reused, and the blocks stay separate modules for wrapping and checkpoint names."""
    for block in model.layers.children():
        block.compile()


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    if cfg.training.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.training.compile:
        apply_compile(model)
    return model
