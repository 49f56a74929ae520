"""Apply activation checkpointing, compilation and data parallelism to a plain Transformer."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh

from clusterlm.config import Config
from clusterlm.parallel.data_parallel import apply_data_parallel


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


def parallelize(
    model: nn.Module, cfg: Config, mesh: DeviceMesh | None, compute_dtype: torch.dtype
) -> nn.Module:
    """In torchtitan's order: activation checkpointing, compile, then data parallel (outermost,
    so FSDP units wrap compiled, checkpointed blocks). ``mesh`` is None in a single process."""
    if cfg.training.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.training.compile:
        apply_compile(model)
    if mesh is not None:
        param_dtype = None if compute_dtype == torch.float32 else compute_dtype
        model = apply_data_parallel(model, mesh, cfg.parallel, cfg.comm, param_dtype)
    return model
