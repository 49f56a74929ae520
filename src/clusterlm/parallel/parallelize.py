"""Apply the parallelisms to a plain Transformer and return what the training loop needs.

``parallelize`` splits the model into pipeline stages (when ``parallel.pp > 1``), then applies to
each part, in torchtitan's order, tensor parallel, activation checkpointing, compile and data
parallel (outermost, so FSDP units wrap compiled, checkpointed blocks). What it returns, a
``ParallelModel``, does the strategy-specific parts of a step: forward and backward of the
micro-batches, the evaluation loss, gradient clipping, building the optimizers and the
checkpoint state. The loop therefore never asks which strategy it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from clusterlm.comm.hooks import CommHookState
from clusterlm.config import Config, ParallelConfig
from clusterlm.config.degrees import pipeline_microbatches
from clusterlm.data.packing import Packing
from clusterlm.models import Encoder, Seq2SeqTransformer, Transformer, model_args
from clusterlm.models.init import ParamSource
from clusterlm.models.loss import next_token_loss
from clusterlm.models.moe import auxiliary_loss
from clusterlm.parallel.activation_checkpointing import apply_activation_checkpointing
from clusterlm.parallel.compiling import apply_compile, separate_compile_cache
from clusterlm.parallel.context_parallel import apply_context_parallel, model_inputs
from clusterlm.parallel.data_parallel import SHARDED, apply_data_parallel
from clusterlm.parallel.expert_parallel import apply_expert_parallel
from clusterlm.parallel.local_sgd import LocalSGDModel
from clusterlm.parallel.materialize import canonical_name, materialize
from clusterlm.parallel.model import ParallelModel, Pipeline, PipelinedModel, WholeModel
from clusterlm.parallel.packed_inputs import ModelInputs
from clusterlm.parallel.pipeline import (
    build_schedule,
    split_into_stages,
)
from clusterlm.parallel.precision import Precision
from clusterlm.parallel.ps import PSRole, parameter_server_model
from clusterlm.parallel.stage_inputs import StageInputs
from clusterlm.parallel.tensor_parallel import apply_tensor_parallel


def _model_loss(
    model: nn.Module,
    precision: Precision,
    inputs: ModelInputs,
    label_smoothing: float,
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    x, y, kwargs = inputs(x, y)
    with precision.autocast():
        logits = model(x, **kwargs)
    balance = auxiliary_loss(model)  # a mixture of experts' load-balancing loss, if it has one
    loss = next_token_loss(logits, y, label_smoothing=label_smoothing)
    return loss if balance is None else loss + balance


def _wrap_data_parallel(
    part: nn.Module,
    mesh: DeviceMesh,
    cfg: Config,
    precision: Precision,
    comm: list[CommHookState],
) -> nn.Module:
    """``part`` wrapped for data parallel; its communication hook's state, if any, joins
    ``comm``."""
    param_dtype = None if precision.compute_dtype == torch.float32 else precision.compute_dtype
    part, state = apply_data_parallel(part, mesh, cfg.parallel, cfg.comm, param_dtype)
    comm.extend(filter(None, [state]))
    return part


def _parallelize_part(
    part: nn.Module,
    cfg: Config,
    mesh: DeviceMesh | None,
    precision: Precision,
    comm: list[CommHookState],
    fill: Callable[[nn.Module], None],
    sharded: bool,
) -> nn.Module:
    """``part`` with, in this order, tensor parallel, expert parallel, activation checkpointing,
    compile, data parallel and context parallel applied. ``fill`` materializes it: before data
    parallel unless ``sharded`` (DDP needs whole tensors), and after it (FSDP has cut the tensors
    by then)."""
    p, training = cfg.parallel, cfg.training
    if mesh is not None and p.tp > 1:
        # Fine-tuning a classifier runs no tensor parallel.
        assert isinstance(part, (Transformer, Encoder, Seq2SeqTransformer))
        apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel)
    if mesh is not None and p.ep > 1:
        apply_expert_parallel(part, mesh, p.ep)
    if not sharded:
        fill(part)
    if training.activation_checkpointing != "none":
        apply_activation_checkpointing(part, training.activation_checkpointing)
    if training.compile and mesh is not None:  # one process compiles forward and loss whole
        apply_compile(part)
    if mesh is not None:
        part = _wrap_data_parallel(part, mesh, cfg, precision, comm)
    if mesh is not None and p.cp > 1:  # after DDP's one-token warm-up backward
        apply_context_parallel(part, mesh["cp"].get_group(), p.cp_attention)
    fill(part)
    return part


def _whole_loss(
    part: nn.Module,
    precision: Precision,
    inputs: ModelInputs,
    compile_whole: bool,
    label_smoothing: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``part`` on a batch; with ``compile_whole``, one graph from tokens to
    loss: the compiler fuses across blocks, the embeddings, the head and the loss. (Across
    processes each block is compiled instead.)"""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = partial(
        _model_loss, part, precision, inputs, label_smoothing
    )
    if compile_whole:
        loss_fn = torch.compile(loss_fn)
    return loss_fn


def _whole_model(
    loss_fn: Callable,
    part: nn.Module,
    mesh: DeviceMesh | None,
    p: ParallelConfig,
    common: dict[str, Any],
    ps: PSRole | None,
) -> ParallelModel:
    if ps is not None:
        return parameter_server_model(ps, loss_fn=loss_fn, parts=[part], **common)
    if p.data_parallel in ("local_sgd", "diloco"):
        group = mesh["dp_replicate"].get_group() if mesh is not None else None
        outer = (
            {"lr": p.outer_lr, "momentum": p.outer_momentum}
            if p.data_parallel == "diloco"
            else None
        )
        return LocalSGDModel(group, p.local_steps, outer, loss_fn=loss_fn, parts=[part], **common)
    return WholeModel(loss_fn, parts=[part], **common)


def _pipelined_model(
    model: nn.Module,
    p: ParallelConfig,
    mesh: DeviceMesh,
    device: torch.device,
    parallelize_part: Callable[[nn.Module], nn.Module],
    common: dict[str, Any],
    label_smoothing: float,
) -> ParallelModel:
    """This rank's pipeline stages of ``model``, each parallelized by ``parallelize_part``."""
    # The configuration checks allow decoders only in a pipeline.
    assert isinstance(model, Transformer)
    stages = split_into_stages(
        model,
        mesh["pp"].get_group(),
        p.pp_schedule,
        p.pp_stages_per_rank or None,
        parallelize_stage=parallelize_part,
        device=device,
    )
    micro_batches = pipeline_microbatches(p)
    loss_fn = partial(next_token_loss, label_smoothing=label_smoothing)
    schedule = build_schedule(stages, p.pp_schedule, micro_batches, loss_fn)
    pipeline = Pipeline(schedule, stages, micro_batches, StageInputs(stages))
    return PipelinedModel(pipeline, parts=[stage.submod for stage in stages], **common)


def parallelize(
    model: nn.Module,
    cfg: Config,
    mesh: DeviceMesh | None,
    device: torch.device,
    source: ParamSource | None = None,
    ps: PSRole | None = None,
    packing: Packing | None = None,
) -> ParallelModel:
    """This rank's share of ``model``, parallelized for ``cfg`` on ``mesh`` (None in a single
    process and in a parameter-server job, where ``ps`` is this rank's role). ``model`` is either
    on ``device`` and initialized, or on the meta device: then each part is materialized once it
    is cut (after FSDP, or before DDP, which needs whole tensors), so this rank only ever
    allocates its share, filled from ``source``. ``packing`` says where the documents of a window
    end, for document masking and positions that restart at each (``clusterlm.data.packing``)."""
    p = cfg.parallel
    if cfg.training.compile:
        separate_compile_cache()
    sharded = mesh is not None and p.data_parallel in SHARDED
    precision = Precision(cfg.training.precision, device, sharded=sharded)
    comm: list[CommHookState] = []
    init_device = torch.device("cpu") if sharded and p.cpu_offload else device
    canonical = partial(canonical_name, tied_embeddings=model_args(model).tie_embeddings)

    def fill(part: nn.Module) -> None:
        materialize(part, source, init_device, canonical)

    def parallelize_part(part: nn.Module) -> nn.Module:
        return _parallelize_part(part, cfg, mesh, precision, comm, fill, sharded)

    common = {
        "precision": precision,
        "tp_size": p.tp if mesh is not None else 1,
        "comm": comm,
        "shard_optimizer": mesh is not None and p.data_parallel == "zero1",
    }
    smoothing = cfg.training.label_smoothing
    if mesh is None or p.pp == 1:
        part = parallelize_part(model)
        inputs = model_inputs(cfg, packing or Packing(), device, mesh)
        compile_whole = cfg.training.compile and mesh is None
        loss_fn = _whole_loss(part, precision, inputs, compile_whole, smoothing)
        whole = _whole_model(loss_fn, part, mesh, p, common, ps)
        whole.inputs = inputs
        return whole
    pipelined = _pipelined_model(model, p, mesh, device, parallelize_part, common, smoothing)
    pipelined.inputs = model_inputs(cfg, packing or Packing(), device, mesh)
    return pipelined
