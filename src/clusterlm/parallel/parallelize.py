"""Apply activation checkpointing, compilation and data parallelism to a plain Transformer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from clusterlm.config import Config
from clusterlm.parallel.data_parallel import apply_data_parallel
from clusterlm.parallel.pipeline import build_schedule, split_into_stages
from clusterlm.parallel.tensor_parallel import apply_tensor_parallel

# Outputs worth keeping under selective checkpointing: the matmuls and attention, whose recompute
# costs FLOPs. Norms, activations, dropout and adds are recomputed: cheap, and most of the memory
# (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
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
    options = {}
    if mode == "selective":
        options["context_fn"] = partial(create_selective_checkpoint_contexts, _save_expensive_ops)
    for name, block in model.layers.named_children():
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=True, **options))


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: every block has the same graph, so it compiles once and
    is reused, and the blocks stay separate modules for wrapping and checkpoint names."""
    for block in model.layers.children():
        block.compile()


@dataclass
class Pipeline:
    """This rank's pipeline stages and the schedule that runs them."""

    schedule: Any
    stages: list[PipelineStage]


def parallelize(
    model: nn.Module, cfg: Config, mesh: DeviceMesh | None, compute_dtype: torch.dtype
) -> tuple[list[nn.Module], Pipeline | None]:
    """This rank's model parts, parallelized, and its pipeline (None without one).

    The pipeline split comes first; then each part gets, in torchtitan's order, tensor parallel,
    activation checkpointing, compile, and data parallel (outermost, so FSDP units wrap compiled,
    checkpointed blocks). ``mesh`` is None in a single process."""
    def parallelize_part(part: nn.Module) -> nn.Module:
        if mesh is not None and cfg.parallel.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], cfg.parallel.sequence_parallel)
        if cfg.training.activation_checkpointing != "none":
            apply_activation_checkpointing(part, cfg.training.activation_checkpointing)
        if cfg.training.compile and mesh is not None:  # one process compiles forward and loss whole
            apply_compile(part)
        if mesh is not None:
            param_dtype = None if compute_dtype == torch.float32 else compute_dtype
            part = apply_data_parallel(part, mesh, cfg.parallel, cfg.comm, param_dtype)
        return part

    if mesh is None or cfg.parallel.pp == 1:
        return [parallelize_part(model)], None
    p = cfg.parallel
    stages = split_into_stages(model, mesh["pp"].get_group(), p.pp_schedule, p.pp_stages_per_rank or None,
                               parallelize_stage=parallelize_part)
    schedule = build_schedule(stages, p.pp_schedule, p.pp_microbatches or 2 * p.pp)
    return [stage.submod for stage in stages], Pipeline(schedule, stages)
